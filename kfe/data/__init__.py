"""Offline real (and synthetic) datasets for the experiment harness.

>>> from kfe.data import load_dataset
>>> ds = load_dataset("synthetic32", train_limit=256, test_limit=64)
>>> ds.input_shape, ds.num_classes
((3, 32, 32), 10)

Datasets: ``mnist``, ``fashion-mnist``, ``cifar10``, ``digits``, ``synthetic32``. Nothing is
downloaded; see ``docs/datasets.md`` for where each is found and how to get it.
"""

from __future__ import annotations

from kfe.data.dataset import Dataset, DatasetNotFound
from kfe.data.idx import IdxFormatError, read_idx, write_idx
from kfe.data.paths import default_cache_dir, default_data_dir
from kfe.data.sources import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFound",
    "IdxFormatError",
    "default_cache_dir",
    "default_data_dir",
    "load_dataset",
    "read_idx",
    "write_idx",
]
