"""``signsgd``: sign descent in the KFE, with optional momentum (signum).

.. math::

    m \\leftarrow \\beta m + (1 - \\beta) \\tilde M, \\qquad \\tilde D = \\mathrm{sign}(m)

(``beta = 0``: ``sign(M~)``, plain signSGD; Bernstein et al., 2018). Basis change:
``rotate`` (default; ``m`` is a KFE-coordinate vector and is carried over exactly),
``keep`` or ``reset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, hookimpl


class SignSGDConfig(RuleConfig):
    name: Literal["signsgd"] = "signsgd"
    beta: float = Field(0.0, ge=0, lt=1)
    """Momentum of the signed average (0: plain signSGD)."""
    basis_policy: Literal["rotate", "keep", "reset"] = "rotate"
    """What happens to the momentum at a basis refresh."""


class SignSGDState(NamedTuple):
    momentum: Tensor


class SignSGD(Rule[SignSGDConfig]):
    name = "signsgd"
    Config = SignSGDConfig
    State = SignSGDState
    policies = (BasisPolicy.ROTATE, BasisPolicy.KEEP, BasisPolicy.RESET)
    rotatable = ("momentum",)

    def init(self, like: Tensor) -> Any:
        return SignSGDState(torch.zeros_like(like, memory_format=torch.preserve_format))

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        if self.config.beta == 0:
            return grad.sign(), state
        m = state.momentum.lerp(grad, 1 - self.config.beta)
        return m.sign(), SignSGDState(m)


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [SignSGD]
