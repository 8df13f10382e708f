"""Basis ``shampoo``: factors of the minibatch weight gradient (Gupta et al., 2018).

.. math::  A = G^\\top G, \\qquad B = G G^\\top ,

folded into EMAs (``factor_decay``) every ``factor_every`` steps and eigendecomposed
every ``basis_every`` steps with the same robust solver. No hooks: any weight that can
be viewed as a matrix gets a basis (conv kernels as ``(C_out, C_in kh kw)``, with the
bias column when the layer has an adapter; embeddings and other untracked matrices as
``(shape[0], -1)``). Adam in this basis is SOAP (Vyas et al., 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from kfe import BasisSource, BasisSourceConfig, hookimpl
from kfe.basis import PAD_MULTIPLE
from kfe.statistics import gram


class ShampooBasisConfig(BasisSourceConfig):
    name: Literal["shampoo"] = "shampoo"
    cover_untracked: bool = True
    """Give a basis to parameters no layer adapter covers (embeddings, ...) when they have
    at least two dims; ``false`` leaves them to the fallback rule."""


class ShampooBasis(BasisSource):
    name = "shampoo"
    Config = ShampooBasisConfig

    @property
    def covers_untracked(self) -> bool:
        return bool(getattr(self.config, "cover_untracked", True))

    def batch_factors(
        self, grad: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor] | None:
        padded = _pad_to_multiple(grad)  # BLAS is slow on the odd sizes a bias column makes
        rows, cols = grad.shape
        return gram(padded)[:cols, :cols], gram(padded.mT)[:rows, :rows]


def _pad_to_multiple(matrix: Tensor) -> Tensor:
    extra_rows, extra_cols = ((-n) % PAD_MULTIPLE for n in matrix.shape)
    if not (extra_rows or extra_cols):
        return matrix
    return torch.nn.functional.pad(matrix, (0, extra_cols, 0, extra_rows))


@hookimpl
def kfe_bases() -> Sequence[type[Any]]:
    return [ShampooBasis]
