"""Basis ``kfac``: K-FAC's factors ``A = E[x x^T]``, ``B = E[g g^T]`` from the layer hooks.

Scaling conventions (weight sharing, bias coordinate) are those of
:mod:`kfe.statistics`. Only layers with an adapter get this basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from kfe import BasisSource, BasisSourceConfig, hookimpl
from kfe.statistics import batch_factors


class KFACBasisConfig(BasisSourceConfig):
    name: Literal["kfac"] = "kfac"


class KFACBasis(BasisSource):
    name = "kfac"
    Config = KFACBasisConfig
    needs_capture = True
    fisher_eigenvalues = True

    def batch_factors(
        self, grad: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor] | None:
        return batch_factors(pairs, grad.shape[1]) if pairs else None


@hookimpl
def kfe_bases() -> Sequence[type[Any]]:
    return [KFACBasis]
