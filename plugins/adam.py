"""``adam``: Adam in the KFE; on the ``shampoo`` basis this is SOAP (Vyas et al., 2024).

.. math::

    m \\leftarrow \\beta_1 m + (1-\\beta_1)\\tilde M, \\quad
    v \\leftarrow \\beta_2 v + (1-\\beta_2)\\tilde M^{\\odot 2}, \\quad
    \\tilde D = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t)} + \\epsilon}.

In the identity basis this is ``torch.optim.Adam`` (with ``weight_decay_style="l2"``)
or ``AdamW`` (``"decoupled"``): weight decay stays in parameter space, outside the rule.

Basis change: ``rotate`` (default, as SOAP): the first moment is a vector in KFE
coordinates and is carried over exactly, ``m <- U_B'^T U_B m U_A^T U_A'``; the second
moment cannot be rotated and stays with the eigenvector it belongs to (the refresh
matches new eigenvectors to old ones). ``keep`` leaves both; ``reset`` restarts both
from zero, bias correction included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, hookimpl


class AdamConfig(RuleConfig):
    name: Literal["adam"] = "adam"
    beta1: float = Field(0.9, ge=0, lt=1)
    """EMA decay of the first moment."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """EMA decay of the second moment."""
    eps: float = Field(1e-8, ge=0)
    """Added to the bias-corrected ``sqrt(v)``."""
    basis_policy: Literal["rotate", "keep", "reset"] = "rotate"
    """What happens to the moments at a basis refresh."""


class AdamState(NamedTuple):
    step: int
    """Updates since the last reset (a host int: no device sync for bias correction)."""
    exp_avg: Tensor
    exp_avg_sq: Tensor


class Adam(Rule[AdamConfig]):
    name = "adam"
    Config = AdamConfig
    State = AdamState
    policies = (BasisPolicy.ROTATE, BasisPolicy.KEEP, BasisPolicy.RESET)
    rotatable = ("exp_avg",)

    def init(self, like: Tensor) -> Any:
        zeros = torch.zeros_like(like, memory_format=torch.preserve_format)
        return AdamState(0, zeros, zeros.clone())

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        cfg = self.config
        step = state.step + 1
        # in place, as torch.optim.Adam: the moments belong to this state alone
        m = state.exp_avg.lerp_(grad, 1 - cfg.beta1)
        v = state.exp_avg_sq.mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
        bias1 = 1 - cfg.beta1**step
        bias2_sqrt = (1 - cfg.beta2**step) ** 0.5
        denom = v.sqrt().div_(bias2_sqrt).add_(cfg.eps)
        return torch.div(m, denom, out=denom).div_(bias1), AdamState(step, m, v)

    def diagonal(self, state: Any, ctx: RuleContext) -> Tensor | None:
        """The bias-corrected second moment ``v / (1 - beta2^t)``, the one Adam divides by
        (under a square root). Scale: an EMA of the squared projected *minibatch-mean*
        gradient, about ``1/n`` of the per-example Fisher diagonal (see ``rmsprop``)."""
        if state.step == 0:
            return state.exp_avg_sq
        return state.exp_avg_sq / (1 - self.config.beta2**state.step)


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [Adam]
