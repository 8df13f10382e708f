"""A robust symmetric eigensolver for Kronecker factors (DESIGN.md §3).

``torch.linalg.eigh`` fails on singular, non-finite or badly scaled factors. The
solver here symmetrises, checks finiteness, tries the working dtype, then float64,
then float64 with a growing diagonal jitter ``eps * (mean |diag| + tiny) * 10^k``.
It returns ``None`` when every try fails: the caller keeps its previous basis.
Tiny negative eigenvalues (round-off of a PSD matrix) are clamped at zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["power_qr", "robust_eigh"]

JITTER_TRIES = 4
JITTER_START = 1e-10


def _try_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except (torch.linalg.LinAlgError, RuntimeError):
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return values, vectors


def robust_eigh(factor: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
    """Eigendecomposition ``factor = V diag(w) V^T`` of a symmetric PSD factor.

    Args:
        factor: a square matrix, symmetric up to round-off.
        dtype: the dtype of the first try (default: the factor's own).

    Returns:
        ``(w, V)`` in ascending order of ``w``, ``w >= 0``, both in the factor's dtype;
        or ``None`` if the factor is not finite or every try failed.
    """
    if not torch.isfinite(factor).all():
        return None
    out_dtype = factor.dtype
    sym = (factor + factor.mT) / 2
    found = _try_eigh(sym.to(dtype or out_dtype))
    if found is None:
        sym64 = sym.double()
        found = _try_eigh(sym64)
        scale = sym64.diagonal().abs().mean().item() + torch.finfo(torch.float64).tiny
        eye = torch.eye(sym64.shape[0], dtype=torch.float64, device=sym64.device)
        for k in range(JITTER_TRIES):
            if found is not None:
                break
            found = _try_eigh(sym64 + (JITTER_START * 10 ** (2 * k) * scale) * eye)
    if found is None:
        return None
    values, vectors = found
    return values.clamp_min(0).to(out_dtype), vectors.to(out_dtype)


def power_qr(factor: Tensor, previous: Tensor) -> tuple[Tensor, Tensor] | None:
    """One step of subspace iteration warm-started at ``previous`` (SOAP's refresh).

    Following Vyas et al. (2024): Rayleigh quotients ``est = diag(Q^T F Q)`` of the old
    eigenvectors ``Q``, one power step ``F Q`` with the columns in decreasing ``est``
    order, and a QR factorisation. The columns are then put back in their old order, so
    column ``j`` still follows old column ``j`` (no matching needed); the eigenvalue
    estimate of column ``j`` is ``est[j]``. Cost: one matmul and one QR instead of an
    ``eigh``; the basis converges to the eigenvectors over refreshes rather than at once.

    Returns:
        ``(est, Q')`` clamped at zero, or ``None`` if anything is not finite.
    """
    if not torch.isfinite(factor).all():
        return None
    sym = (factor + factor.mT) / 2
    power = sym @ previous
    estimate = (previous * power).sum(dim=0)
    order = estimate.argsort(descending=True)
    try:
        q, _ = torch.linalg.qr(power[:, order])
    except (torch.linalg.LinAlgError, RuntimeError):
        return None
    vectors = torch.empty_like(q)
    vectors[:, order] = q
    if not torch.isfinite(vectors).all():
        return None
    return estimate.clamp_min(0), vectors
