"""Tensor memory of a block of code: the peak of what its ops allocate, and its largest tensor.

``with track_allocations() as usage: opt.step()`` counts every strided tensor storage an
aten op returns inside the block from the op that creates it until it is freed (the last
tensor viewing it is gone), so that

- ``usage.peak_bytes`` is the high-water mark of the block's own live tensors: the
  transient memory a step needs on top of what existed before it (parameters, gradients,
  captures, optimizer state);
- ``usage.largest_bytes`` (and ``usage.largest_shape``) is its largest single tensor, e.g.
  to check that EKFAC's Lambda never forms a ``(batch, d_out, d_in)`` per-example gradient
  tensor for ``nn.Linear`` and keeps the per-example chunks of weight-sharing layers under
  ``lambda_chunk_mb``;
- ``usage.retained_bytes`` is what the block allocated and still holds at its end (new
  optimizer state).

What it sees, and what it does not (the counts are deterministic, not a measurement of
the process's memory):

- **Counted:** the outputs of every op dispatched inside the block, on one device or all
  (``device``); a storage that an op grows (``resize_``, an ``out=`` tensor too small)
  counts for what it grew by.
- **Not counted:** storages that existed before the block, also when an op writes into
  them or views them; memory a kernel allocates for itself and frees before returning
  (BLAS and LAPACK workspaces, the contiguous copy a kernel may make of a strided input,
  sort buffers); tensors made outside the dispatcher (``torch.tensor(list)``,
  ``torch.from_numpy``); meta tensors; sparse tensors and the inner tensors of wrapper
  subclasses (only strided outputs are counted, at their own size).
- Old storages freed inside the block are not subtracted: ``peak_bytes`` is what the
  block adds at its worst, not the process's net change.

The counting runs in a ``TorchDispatchMode``: every op pays a Python call, so time
measured under it means nothing; it is for memory only (``benchmarks/memory.py``).
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


def _storages(values: Any) -> dict[int, int]:
    """``id -> bytes`` of the storages of the strided tensors (and bare storages) in a
    pytree of op arguments."""
    found = {}
    for v in tree_leaves(values):
        if isinstance(v, Tensor) and v.layout == torch.strided:
            v = v.untyped_storage()
        if isinstance(v, torch.UntypedStorage):
            found[id(v)] = v.nbytes()
    return found


class _Tracker(TorchDispatchMode):
    def __init__(self, usage: Allocations, record_shapes: bool, device: torch.device | None):
        super().__init__()
        self.usage = usage
        self.record_shapes = record_shapes
        self.device = device
        self._live: dict[int, int] = {}  # id of a counted storage's Python object -> bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = _storages((args, kwargs))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.layout == torch.strided:
                self._count(t, before)
        return out

    def _count(self, tensor: Tensor, before: dict[int, int]) -> None:
        if tensor.device.type == "meta" or (
            self.device is not None and tensor.device != self.device
        ):
            return
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in before:  # an input's storage (in place, out=, a view): count growth only
            size -= before[key]
        elif key in self._live:
            return  # already counted (a second output on the same storage)
        if size <= 0:
            return
        usage = self.usage
        if key in self._live:
            self._live[key] += size
        else:
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
def track_allocations(
    record_shapes: bool = False, device: str | torch.device | None = None
) -> Iterator[Allocations]:
    """Count the tensor storages the ops inside the ``with`` block allocate (module doc).

    Args:
        record_shapes: also keep ``(shape, bytes)`` of every allocation in
            :attr:`Allocations.shapes`.
        device: count only tensors on this device (e.g. ``"cuda"`` to leave out the CPU
            tensors a GPU step also makes); default: every device but ``meta``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> with track_allocations() as usage:
        ...     y = model(torch.randn(8, 4))
        >>> usage.largest_shape
        (8, 4)
    """
    usage = Allocations()
    where = None if device is None else torch.device(device)
    if where is not None and where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    with _Tracker(usage, record_shapes, where):
        yield usage
