"""The Kronecker-factored eigenbasis: rotate into it and out of it.

With ``A = U_A diag(a) U_A^T`` (input side) and ``B = U_B diag(b) U_B^T`` (output side),
a parameter-space matrix ``M`` of shape ``(d_out, d_in)`` has KFE coordinates

.. math::  \\tilde M = U_B^\\top M U_A, \\qquad M = U_B \\tilde M U_A^\\top .

This is ``(U_A \\otimes U_B)^T vec(M)`` in column-major ``vec``; the Kronecker product
is never formed. A change of basis from ``(U_B, U_A)`` to ``(U_B', U_A')`` maps KFE
coordinates exactly by ``U_B'^T U_B \\tilde M U_A^T U_A'`` (:meth:`Eigenbasis.rotation_to`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Eigenbasis"]


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
        return self.U_B.mT @ matrix @ self.U_A

    def unproject(self, matrix: Tensor) -> Tensor:
        """KFE coordinates to parameter space: ``U_B M U_A^T``."""
        return self.U_B @ matrix @ self.U_A.mT

    def aligned_to(self, old: Eigenbasis) -> Eigenbasis:
        """This basis with its eigenvectors reordered to follow ``old``'s.

        Column ``i`` of the result is the new eigenvector that overlaps most with old
        column ``i`` (``|U_old^T U_new|``, matched greedily by decreasing overlap), so
        a refresh that only re-sorts the eigenvalues leaves every index in place.
        """
        perm_B = _match(old.U_B, self.U_B)
        perm_A = _match(old.U_A, self.U_A)
        return Eigenbasis(self.U_B[:, perm_B], self.b[perm_B], self.U_A[:, perm_A], self.a[perm_A])

    def rotation_to(self, new: Eigenbasis) -> tuple[Tensor, Tensor]:
        """``(R_B, R_A)`` with ``R = U^T U'``, so new coordinates are ``R_B^T M R_A``."""
        return self.U_B.mT @ new.U_B, self.U_A.mT @ new.U_A


def _match(old: Tensor, new: Tensor) -> Tensor:
    """``perm`` with ``new[:, perm[i]]`` the column best matching ``old[:, i]``."""
    overlap = (old.mT @ new).abs()
    best = overlap.argmax(dim=1)
    if torch.unique(best).numel() == best.numel():
        return best
    perm = torch.empty_like(best)
    taken = torch.zeros(overlap.shape[1], dtype=torch.bool, device=overlap.device)
    for i in overlap.amax(dim=1).argsort(descending=True).tolist():
        j = overlap[i].masked_fill(taken, -1.0).argmax()
        perm[i] = j
        taken[j] = True
    return perm
