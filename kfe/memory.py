"""Tensor memory of a block of code: the peak of what it allocates, and its largest tensor.

``with track_allocations() as usage: opt.step()`` counts every tensor storage an aten op
creates inside the block (on any device) from its allocation until it is freed (the last
tensor viewing it is gone), so that

- ``usage.peak_bytes`` is the high-water mark of the block's own live allocations: the
  transient memory a step needs on top of what existed before it (parameters, gradients,
  captures, optimizer state);
- ``usage.largest_bytes`` (and ``usage.largest_shape``) is its largest single tensor, e.g.
  to check that EKFAC's Lambda never forms a ``(batch, d_out, d_in)`` per-example gradient
  tensor for ``nn.Linear`` and keeps the per-example chunks of weight-sharing layers under
  ``lambda_chunk_mb``;
- ``usage.retained_bytes`` is what the block allocated and still holds at its end (new
  optimizer state).

Storages that existed before the block are never counted, including when an op writes
into them (in-place ops, ``out=``) or views them. Scratch memory inside a kernel (BLAS or
LAPACK workspaces) is not a tensor and is not counted. The counting runs in a
``TorchDispatchMode``: every op pays a Python call, so time measured under it means
nothing; it is for memory only (``benchmarks/memory.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Allocations", "track_allocations"]


@dataclass
class Allocations:
    """What the tracked block allocated (bytes); see :func:`track_allocations`."""

    peak_bytes: int = 0
    """Largest total of the block's own storages alive at one time."""
    largest_bytes: int = 0
    """Largest single storage the block allocated."""
    largest_shape: tuple[int, ...] = ()
    """Shape of the tensor that first allocated it."""
    live_bytes: int = 0
    """The block's storages alive now (after the block: :attr:`retained_bytes`)."""
    count: int = 0
    """Number of storages allocated."""
    shapes: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    """``(shape, bytes)`` of every allocation, in order, if asked for."""

    @property
    def retained_bytes(self) -> int:
        """What the block allocated and still holds (read after the block)."""
        return self.live_bytes


class _Tracker(TorchDispatchMode):
    def __init__(self, usage: Allocations, record_shapes: bool) -> None:
        super().__init__()
        self.usage = usage
        self.record_shapes = record_shapes
        self._live: dict[int, int] = {}  # id of a storage's Python object -> its bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and t.layout == torch.strided
        }
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.layout == torch.strided:
                self._count(t, before)
        return out

    def _count(self, tensor: Tensor, before: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in before or key in self._live:
            return  # an input's storage (in place, out=, a view) or already counted
        size = storage.nbytes()
        usage = self.usage
        self._live[key] = size
        weakref.finalize(storage, self._free, key)
        usage.count += 1
        usage.live_bytes += size
        usage.peak_bytes = max(usage.peak_bytes, usage.live_bytes)
        if size > usage.largest_bytes:
            usage.largest_bytes, usage.largest_shape = size, tuple(tensor.shape)
        if self.record_shapes:
            usage.shapes.append((tuple(tensor.shape), size))

    def _free(self, key: int) -> None:
        self.usage.live_bytes -= self._live.pop(key, 0)


@contextmanager
def track_allocations(record_shapes: bool = False) -> Iterator[Allocations]:
    """Count the tensor storages allocated inside the ``with`` block (module doc).

    Args:
        record_shapes: also keep ``(shape, bytes)`` of every allocation in
            :attr:`Allocations.shapes`.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> with track_allocations() as usage:
        ...     y = model(torch.randn(8, 4))
        >>> usage.largest_shape
        (8, 4)
    """
    usage = Allocations()
    with _Tracker(usage, record_shapes):
        yield usage
