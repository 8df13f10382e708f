"""``lion``: Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") in the KFE.

.. math::

    \\tilde D = \\mathrm{sign}(\\beta_1 m + (1 - \\beta_1) \\tilde M), \\qquad
    m \\leftarrow \\beta_2 m + (1 - \\beta_2) \\tilde M .

The momentum ``m`` lives in KFE coordinates, so at a basis refresh it is rotated
exactly (``rotate``, the default), or kept, or reset. Use decoupled weight decay
(kfe's default ``weight_decay_style``), as Lion does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, hookimpl


class LionConfig(RuleConfig):
    name: Literal["lion"] = "lion"
    beta1: float = Field(0.9, ge=0, lt=1)
    """Interpolation between momentum and gradient for the sign."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """EMA decay of the momentum."""
    basis_policy: Literal["rotate", "keep", "reset"] = "rotate"
    """What happens to the momentum at a basis refresh."""


class LionState(NamedTuple):
    momentum: Tensor


class Lion(Rule[LionConfig]):
    name = "lion"
    Config = LionConfig
    State = LionState
    policies = (BasisPolicy.ROTATE, BasisPolicy.KEEP, BasisPolicy.RESET)
    rotatable = ("momentum",)

    def init(self, like: Tensor) -> Any:
        return LionState(torch.zeros_like(like))

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        direction = state.momentum.lerp(grad, 1 - self.config.beta1).sign()
        return direction, LionState(state.momentum.lerp(grad, 1 - self.config.beta2))


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [Lion]
