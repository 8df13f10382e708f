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

from kfe.basis import pad_square

__all__ = ["Solved", "power_qr", "robust_eigh", "symmetrize"]

Solved = tuple[Tensor, Tensor] | None
"""An eigendecomposition ``(values, vectors)``, or ``None`` where it failed."""

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


def symmetrize(matrix: Tensor) -> Tensor:
    """``(M + M^T) / 2`` in one new tensor (the halving in place): bitwise the same as
    the two-temporary expression, and about 4x faster on CPU at side 1000."""
    return torch.add(matrix, matrix.mT).mul_(0.5)


def robust_eigh(factor: Tensor, dtype: torch.dtype | None = None) -> Solved:
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
    sym = symmetrize(factor)
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


def power_qr(factor: Tensor, previous: Tensor) -> Solved:
    """One step of subspace iteration warm-started at ``previous`` (SOAP's refresh).

    Following Vyas et al. (2024): Rayleigh quotients ``est = diag(Q^T F Q)`` of the old
    eigenvectors ``Q``, one power step ``F Q`` with the columns in decreasing ``est``
    order, and a QR factorisation. The columns are then put back in their old order, so
    column ``j`` still follows old column ``j`` (no matching needed); the eigenvalue
    estimate of column ``j`` is ``est[j]``. Cost: one matmul and one QR instead of an
    ``eigh``; the basis converges to the eigenvectors over refreshes rather than at once.

    Both run zero-padded to a side that is a multiple of :data:`kfe.basis.PAD_MULTIPLE`
    (BLAS and LAPACK are up to 1.3x slower on the odd sides a bias column makes). This
    is exact: the padded ``F Q`` is ``[[F Q, 0], [0, 0]]`` and its zero columns come last,
    so Householder QR leaves the padding rows of the real columns at exactly zero and
    the real block of ``Q'`` is the QR factor of ``F Q`` itself.

    Returns:
        ``(est, Q')`` clamped at zero, or ``None`` if anything is not finite.
    """
    n = factor.shape[0]
    sym, old = pad_square(symmetrize(factor)), pad_square(previous)
    power = sym @ old
    estimate = (old * power).sum(dim=0)[:n]
    # NaN/inf propagate through the sum: one reduction checks the factor and the basis
    if not bool(estimate.sum().isfinite()):
        return None
    order = estimate.argsort(descending=True, stable=True)
    tail = torch.arange(n, power.shape[0], device=order.device)
    try:
        q, _ = torch.linalg.qr(power[:, torch.cat([order, tail])])
    except (torch.linalg.LinAlgError, RuntimeError):
        return None
    vectors = torch.empty(n, n, dtype=q.dtype, device=q.device)
    vectors[:, order] = q[:n, :n]
    if not bool(vectors.sum().isfinite()):
        return None
    return estimate.clamp_min(0), vectors
