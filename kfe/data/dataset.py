"""The :class:`Dataset` container every loader returns, and the missing-data error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Arrays", "Dataset", "DatasetNotFound", "check_limit", "from_arrays"]

#: ``(x_train, y_train, x_test, y_test)`` as numpy arrays, before conversion to tensors.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DatasetNotFound(FileNotFoundError):
    """A dataset is not available offline; ``str()`` says exactly how to get it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test classification dataset held in memory as tensors.

    ``x_*`` are float32 ``(N, C, H, W)`` with pixel values in ``[0, 1]``; ``y_*`` are int64
    ``(N,)`` labels in ``[0, num_classes)``. Equality is identity (tensors have no ``==``
    that returns a bool).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        """Check shapes, dtypes and that the splits agree."""
        for split in ("train", "test"):
            x: Tensor = getattr(self, f"x_{split}")
            y: Tensor = getattr(self, f"y_{split}")
            if x.dtype != torch.float32 or x.ndim != 4:
                raise ValueError(
                    f"{self.name}: x_{split} must be float32 (N, C, H, W), got {x.dtype}"
                    f" {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 (N,) with N={len(x)}, got"
                    f" {y.dtype} {tuple(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train inputs {tuple(self.x_train.shape[1:])} and test inputs"
                f" {tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``(C, H, W)``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        """A one-line summary (sizes and shapes, not the tensors)."""
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)},"
            f" input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def check_limit(name: str, limit: int | None) -> None:
    """Reject negative or non-integer limits."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {limit!r}")


def _to_images(x: np.ndarray, scale: float) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` array -> float32 ``(N, C, H, W)`` tensor / ``scale``."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected (N, H, W) or (N, C, H, W) images, got shape {x.shape}")
    out = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    if scale != 1.0:
        out.div_(scale)
    return out


def from_arrays(
    name: str,
    arrays: Arrays,
    num_classes: int,
    *,
    scale: float,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Build a :class:`Dataset` from numpy ``(x_train, y_train, x_test, y_test)``.

    Keeps the first ``train_limit`` / ``test_limit`` examples (before converting, so a
    small limit is cheap) and divides pixel values by ``scale`` to land in ``[0, 1]``.
    """
    check_limit("train_limit", train_limit)
    check_limit("test_limit", test_limit)
    x_train, y_train, x_test, y_test = arrays
    x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    return Dataset(
        name=name,
        x_train=_to_images(x_train, scale),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64).copy()),
        x_test=_to_images(x_test, scale),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64).copy()),
        num_classes=num_classes,
    )
