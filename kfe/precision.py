"""The backend precision of float32 matmuls, set around the step's lowerable matmuls.

torch lets a backend compute a float32 matmul with narrower internal arithmetic while
inputs and result stay float32: ``torch.backends.mkldnn.matmul.fp32_precision`` (CPU,
oneDNN: ``"bf16"`` uses the bfloat16 units, ``"tf32"``) and
``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"``). Those are process-wide
settings; :func:`fp32_matmul_precision` sets them for the duration of a block and
restores the previous values on the way out, exceptions included, so kfe's optimizer
can lower the same matmuls ``matmul_dtype`` lowers (Lambda, the projected gradient,
the rotations) and a rule's parameter-space shortcut, and leave the model's forward
and backward, the factors' Gram matrices and the capture check at the process's
setting (docs/precision.md).

oneDNN promises only that ``"bf16"`` is at least as accurate as bfloat16 inputs; on
this project's AVX512-BF16 CPU its float32 kernels came within 1.5x of float32's
rounding error (measured: docs/precision.md). The settings are global, not per thread:
while the block runs, float32 matmuls that other threads issue see them too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

Fp32Precision = Literal["ieee", "bf16", "tf32"]
"""``ieee``: float32 arithmetic; ``bf16``: oneDNN (CPU) only; ``tf32``: oneDNN and CUDA."""

_CUDA_ACCEPTS = frozenset({"ieee", "tf32"})


def _backends(value: str) -> list[Any]:
    """The torch backend settings ``value`` applies to (CUDA has no ``bf16``)."""
    backends: list[Any] = [torch.backends.mkldnn.matmul]  # type: ignore[attr-defined]
    if value in _CUDA_ACCEPTS:
        backends.append(torch.backends.cuda.matmul)
    return backends


@contextmanager
def fp32_matmul_precision(value: Fp32Precision | None) -> Iterator[None]:
    """Within the block, float32 matmuls run at ``value`` (``None``: untouched).

    Nests and restores exactly what it found (``"none"``, torch's default, included).
    """
    if value is None:
        yield
        return
    backends = _backends(value)
    before = [b.fp32_precision for b in backends]
    for backend in backends:
        backend.fp32_precision = value
    try:
        yield
    finally:
        for backend, old in zip(backends, before, strict=True):
            backend.fp32_precision = old
