"""The Kronecker-factored eigenbasis: rotate into it and out of it.

With ``A = U_A diag(a) U_A^T`` (input side) and ``B = U_B diag(b) U_B^T`` (output side),
a parameter-space matrix ``M`` of shape ``(d_out, d_in)`` has KFE coordinates

.. math::  \\tilde M = U_B^\\top M U_A, \\qquad M = U_B \\tilde M U_A^\\top .

This is ``(U_A \\otimes U_B)^T vec(M)`` in column-major ``vec``; the Kronecker product
is never formed. A change of basis from ``(U_B, U_A)`` to ``(U_B', U_A')`` maps KFE
coordinates exactly by ``U_B'^T U_B \\tilde M U_A^T U_A'`` (:meth:`Eigenbasis.rotation_to`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PAD_MULTIPLE", "Eigenbasis", "chain", "match_columns", "pad_square"]

PAD_MULTIPLE = 8
"""Square operators are zero-padded to a multiple of this for matmul speed: BLAS runs
about 1.4x slower on the odd sizes the bias column makes (785, 1001, ...)."""


def pad_square(matrix: Tensor, multiple: int = PAD_MULTIPLE) -> Tensor:
    """Zero-pad a square matrix to a side that is a multiple of ``multiple``."""
    extra = (-matrix.shape[-1]) % multiple
    return F.pad(matrix, (0, extra, 0, extra)) if extra else matrix


def chain(left: Tensor, matrix: Tensor, right: Tensor) -> Tensor:
    """``left @ matrix @ right``, where ``left``/``right`` may be zero-padded squares.

    With padding, only the first ``rows`` columns of ``left`` and ``cols`` rows of
    ``right`` meet ``matrix``, which is exact because the padding is zero; the result is
    cut back to ``matrix``'s shape. ``matrix @ right`` is formed first, so that ``matrix``
    (whose odd row length slows BLAS down as the right operand) is the left operand of
    both products, and nothing is copied. Where ``left``/``right`` are in a lower
    precision than ``matrix`` (``matmul_dtype``), ``matrix`` is rounded to theirs and the
    result cast back to ``matrix``'s dtype.
    """
    if left.dtype != matrix.dtype:  # a lowered-precision basis: compute in its dtype
        return chain(left, matrix.to(left.dtype), right).to(matrix.dtype)
    rows, cols = matrix.shape[-2:]
    if left.shape[-1] == rows and right.shape[-2] == cols:
        return left @ matrix @ right
    out = left[..., :, :rows] @ (matrix @ right[..., :cols, :])
    return out[..., :rows, :cols]


class Eigenbasis(NamedTuple):
    """Eigenvectors and eigenvalues of the two Kronecker factors of one block."""

    U_B: Tensor
    b: Tensor
    U_A: Tensor
    a: Tensor

    @classmethod
    def identity(cls, d_out: int, d_in: int, like: Tensor) -> Eigenbasis:
        """The basis before any refresh: identity vectors, unit eigenvalues."""
        dtype, device = like.dtype, like.device
        return cls(
            torch.eye(d_out, dtype=dtype, device=device),
            torch.ones(d_out, dtype=dtype, device=device),
            torch.eye(d_in, dtype=dtype, device=device),
            torch.ones(d_in, dtype=dtype, device=device),
        )

    def project(self, matrix: Tensor) -> Tensor:
        """Parameter space to KFE coordinates: ``U_B^T M U_A``."""
        return chain(self.U_B.mT, matrix, self.U_A)

    def unproject(self, matrix: Tensor) -> Tensor:
        """KFE coordinates to parameter space: ``U_B M U_A^T``."""
        return chain(self.U_B, matrix, self.U_A.mT)

    def padded(self, dtype: torch.dtype | None = None) -> Eigenbasis:
        """The same basis with ``U_B``, ``U_A`` zero-padded (:func:`pad_square`) for fast
        :meth:`project` / :meth:`unproject`, and cast to ``dtype`` if given (the
        ``matmul_dtype``: :func:`chain` then computes in it); eigenvalues are left as
        they are."""
        U_B, U_A = pad_square(self.U_B), pad_square(self.U_A)
        if dtype is not None:
            U_B, U_A = U_B.to(dtype), U_A.to(dtype)
        return Eigenbasis(U_B, self.b, U_A, self.a)

    def aligned_to(self, old: Eigenbasis) -> Eigenbasis:
        """This basis with its eigenvectors reordered to follow ``old``'s.

        Column ``i`` of the result is the new eigenvector that overlaps most with old
        column ``i`` (``|U_old^T U_new|``, matched greedily by decreasing overlap), so
        a refresh that only re-sorts the eigenvalues leaves every index in place.
        """
        perm_B = match_columns(old.U_B, self.U_B)
        perm_A = match_columns(old.U_A, self.U_A)
        return Eigenbasis(self.U_B[:, perm_B], self.b[perm_B], self.U_A[:, perm_A], self.a[perm_A])

    def rotation_to(self, new: Eigenbasis) -> tuple[Tensor, Tensor]:
        """``(R_B, R_A)`` with ``R = U^T U'``, so new coordinates are ``R_B^T M R_A``."""
        return self.U_B.mT @ new.U_B, self.U_A.mT @ new.U_A

    def rotator_to(self, new: Eigenbasis, count: int = 1) -> Callable[[Tensor], Tensor]:
        """The map from this basis's KFE coordinates to ``new``'s, for ``count`` tensors,
        by the cheaper of two exact routes (in multiply-adds, sides ``p_B``, ``p_A``):

        - through ``R = U^T U'`` (:meth:`rotation_to`), ``R_B^T M R_A``:
          ``p_B^3 + p_A^3`` once, then ``p_B p_A (p_B + p_A)`` per tensor;
        - through parameter space, ``new.project(self.unproject(M))``: twice
          ``p_B p_A (p_B + p_A)`` per tensor.

        The first wins for one or two square-ish blocks, the second for rectangular ones
        (a ``500 x 1001`` block: 1.88 against 1.50 G multiply-adds for one tensor).
        """
        p_B, p_A = self.U_B.shape[-1], self.U_A.shape[-1]
        rotation = p_B * p_A * (p_B + p_A)
        if p_B**3 + p_A**3 + count * rotation <= 2 * count * rotation:
            R_B, R_A = self.rotation_to(new)
            return lambda m: chain(R_B.mT, m, R_A)
        return lambda m: new.project(self.unproject(m))


def match_columns(old: Tensor, new: Tensor) -> Tensor:
    """``perm`` with ``new[:, perm[i]]`` matched to ``old[:, i]``: greedy by overlap.

    The greedy matching takes the largest ``|old_i . new_j|`` among unmatched pairs,
    again and again. It is computed in rounds: every pair that is each other's best
    among the unmatched is in it, so each round matches all such pairs at once (one
    round when no two old vectors prefer the same new one, as after a re-sort), and
    the next round looks only at the rows and columns still unmatched.
    """
    overlap = (old.mT @ new).abs()
    n = overlap.shape[0]
    perm = torch.full((n,), -1, dtype=torch.long, device=overlap.device)
    rows = torch.arange(n, device=overlap.device)
    cols = rows.clone()
    while rows.numel():
        sub = overlap[rows][:, cols]
        best_col = sub.argmax(dim=1)
        best_row = sub.argmax(dim=0)
        mutual = best_row[best_col] == torch.arange(rows.numel(), device=overlap.device)
        perm[rows[mutual]] = cols[best_col[mutual]]
        taken = torch.zeros(cols.numel(), dtype=torch.bool, device=overlap.device)
        taken[best_col[mutual]] = True
        rows, cols = rows[~mutual], cols[~taken]
    return perm
