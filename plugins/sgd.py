"""``sgd``: the identity rule, plain SGD in KFE coordinates (the control).

.. math::  \\tilde D = \\tilde M .

Because the basis is orthogonal, ``U_B U_B^T G U_A U_A^T = G``: with the optimizer's
momentum and weight decay around it, this is ``torch.optim.SGD`` up to round-off,
and exactly ``torch.optim.SGD`` as the parameter-space fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, hookimpl


class SGDConfig(RuleConfig):
    name: Literal["sgd"] = "sgd"


class SGDState(NamedTuple):
    pass


class SGD(Rule[SGDConfig]):
    name = "sgd"
    Config = SGDConfig
    State = SGDState
    policies = (BasisPolicy.RESET,)  # stateless: nothing to carry over

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        return grad, state


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [SGD]
