"""Basis ``identity``: the basis frozen at the identity (parameter space).

Every rule then acts coordinate-wise on the raw gradient: the limit in which ``adam``
is ``torch.optim.Adam``, ``rmsprop`` is ``torch.optim.RMSprop``, ``ekfac`` is the
diagonal empirical Fisher. It has no eigenvalues, so rules that need them (``kfac``) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from kfe import BasisSource, BasisSourceConfig, hookimpl


class IdentityBasisConfig(BasisSourceConfig):
    name: Literal["identity"] = "identity"


class IdentityBasis(BasisSource):
    name = "identity"
    Config = IdentityBasisConfig

    def batch_factors(
        self, grad: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor] | None:
        return None


@hookimpl
def kfe_bases() -> Sequence[type[Any]]:
    return [IdentityBasis]
