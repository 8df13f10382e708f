"""The tiny digits run the in-process CLI tests start from (seconds on one core)."""

from __future__ import annotations

from typing import Any

TINY_RUN: dict[str, Any] = {
    "name": "tiny",
    "epochs": 1,
    "progress": False,
    "tensorboard": False,
    "data": {"name": "digits", "train_limit": 256, "test_limit": 64, "batch_size": 64},
    "model": {"name": "mlp", "hidden": [16]},
    "optimizer": {"rule": "ekfac", "lr": 0.1, "damping": 0.1},
}
