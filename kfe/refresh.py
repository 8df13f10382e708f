"""The amortized part of the pipeline, per block: fold batch factors into their EMAs, and
eigendecompose a factor into a basis that keeps its old order.

.. math::  A \\leftarrow \\beta A + (1 - \\beta) A_{batch}, \\qquad
           B \\leftarrow \\beta B + (1 - \\beta) B_{batch}

(``beta = factor_decay``), every ``factor_every`` steps; every ``basis_every`` steps
``A = U_A diag(a) U_A^T`` and ``B = U_B diag(b) U_B^T`` by the robust solver
(:func:`kfe.eigh.robust_eigh`) or SOAP's warm-started power step and QR
(:func:`kfe.eigh.power_qr`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfe import state_keys as K
from kfe.basis import match_columns
from kfe.eigh import Solved, power_qr, robust_eigh

__all__ = ["fold_factors", "solve_factor"]


def fold_factors(
    st: dict[str, Any],
    A: Tensor,
    B: Tensor,
    decay: float,
    start: tuple[float, float] | None = None,
) -> bool:
    """``A <- lerp(A, A_batch, 1 - decay)``, same for ``B``, in the block's state ``st``.

    The first fold keeps the batch factors themselves as the EMAs (no copy: later folds
    update them in place, so the caller hands over tensors it does not use again, as the
    pipeline's fresh batch factors are), or, with ``start = (s_A, s_B)``
    (``factor_init``), folds them into ``s_A I`` and ``s_B I`` and records what is left
    of that start (``s decay^k`` after ``k`` folds) as the factors' prior. Returns
    ``False``, changing nothing, for non-finite batch factors.
    """
    # Gram matrices: |A_jk| <= sqrt(A_jj A_kk), so finite diagonals mean finite factors
    if not bool(torch.cat([A.diagonal(), B.diagonal()]).isfinite().all()):
        return False
    if K.FACTOR_A not in st:
        if start is None:
            st[K.FACTOR_A], st[K.FACTOR_B] = A.contiguous(), B.contiguous()
            return True
        st[K.FACTOR_A] = start[0] * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        st[K.FACTOR_B] = start[1] * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
        st[K.FACTOR_PRIOR] = (float(start[0]), float(start[1]))
    st[K.FACTOR_A].lerp_(A, 1 - decay)
    st[K.FACTOR_B].lerp_(B, 1 - decay)
    if K.FACTOR_PRIOR in st:
        s_A, s_B = st[K.FACTOR_PRIOR]
        st[K.FACTOR_PRIOR] = (s_A * decay, s_B * decay)
    return True


def solve_factor(
    factor: Tensor,
    old: Tensor,
    *,
    warm: bool,
    dtype: torch.dtype | None = None,
    align: bool = True,
) -> Solved:
    """``(values, vectors)`` of one factor, or ``None`` on failure.

    ``warm``: one power step and QR from the old eigenvectors ``old``, which keeps their
    order by itself; else the robust ``eigh`` (in ``dtype`` if given), with ``align`` its
    eigenvectors reordered to follow the old ones they overlap most (as
    :meth:`kfe.basis.Eigenbasis.aligned_to`), so that state indexed by eigenvector stays
    with its eigenvector when ``eigh`` re-sorts.
    """
    found = power_qr(factor, old) if warm else robust_eigh(factor, dtype)
    if found is None or warm or not align:
        return found
    values, vectors = found
    perm = match_columns(old, vectors)
    return values[perm], vectors[:, perm]
