"""``rmsprop``: RMSProp in the KFE, an EMA of the squared projected minibatch gradient.

.. math::

    v \\leftarrow \\beta_2 v + (1 - \\beta_2)\\, \\tilde M^{\\odot 2}, \\qquad
    \\tilde D = \\tilde M \\oslash (v^{p} + \\epsilon).

With ``exponent`` ``p = 1/2`` this is RMSProp (``torch.optim.RMSprop`` in the identity
basis, ``alpha = beta2``); with ``p = 1`` it is the running-average EKFAC variant of
George et al. (the minibatch second moment in place of the per-example one).
Basis change: ``keep`` (default; the eigenvectors are matched so each second moment
stays with its eigenvector) or ``reset`` (start again from zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, hookimpl


class RMSPropConfig(RuleConfig):
    name: Literal["rmsprop"] = "rmsprop"
    beta2: float = Field(0.99, ge=0, lt=1)
    """EMA decay of the squared projected gradient (torch's ``alpha``)."""
    eps: float = Field(1e-8, ge=0)
    """Added to ``v^exponent``."""
    exponent: float = Field(0.5, gt=0, le=1)
    """``1/2``: RMSProp; ``1``: the running-average EKFAC variant."""
    basis_policy: Literal["keep", "reset"] = "keep"
    """What happens to ``v`` at a basis refresh."""


class RMSPropState(NamedTuple):
    square_avg: Tensor


class RMSProp(Rule[RMSPropConfig]):
    name = "rmsprop"
    Config = RMSPropConfig
    State = RMSPropState
    policies = (BasisPolicy.KEEP, BasisPolicy.RESET)

    def init(self, like: Tensor) -> Any:
        return RMSPropState(torch.zeros_like(like, memory_format=torch.preserve_format))

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        cfg = self.config
        v = state.square_avg.mul(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
        scale = v.sqrt() if cfg.exponent == 0.5 else v.pow(cfg.exponent)
        return grad / scale.add_(cfg.eps), RMSPropState(v)

    def diagonal(self, state: Any, ctx: RuleContext) -> Tensor | None:
        """``v``, the EMA of ``M~^2`` (for any ``exponent``: with ``p = 1`` the rule divides
        by ``v``, with ``p = 1/2`` by ``sqrt(v)``, the square root of this curvature).

        Scale: ``M~`` is the projected *minibatch-mean* gradient, so
        ``E[M~^2] = Lambda / n + (E M~)^2`` for batch size ``n`` and EKFAC's per-example
        ``Lambda``: about ``1/n`` of the Fisher diagonal (no bias correction: ``v``
        starts at zero).
        """
        return state.square_avg


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [RMSProp]
