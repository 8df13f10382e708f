"""``ekfac``: rescale by the exact diagonal second moment in the KFE (George et al., 2018).

.. math::

    \\Lambda_{jk} = \\mathbb E_i\\big[(U_B^\\top G_i U_A)_{jk}^2\\big], \\qquad
    \\tilde D = \\tilde M \\oslash (\\Lambda + \\lambda)
    \\quad\\text{or, with damping\\_scale "mean",}\\quad
    \\tilde M \\oslash (\\Lambda + \\lambda\\, \\overline{\\Lambda}).

``Lambda`` is the diagonal of the Fisher block in the KFE and the best diagonal there
in Frobenius norm. With ``factor_init`` (factors ``A_d + s_A I``, ``B_d + s_B I``) the
prior's diagonal ``s_A b_d + s_B a_d + s_A s_B`` (:meth:`kfe.RuleContext.with_prior`)
is added to ``Lambda``: EKFAC replaces K-FAC's ``b_d a_d`` by the exact second moment
and keeps the rest of K-FAC's model, so the prior acts as it does in K-FAC. Estimators,
updated every ``lambda_every`` steps:

- ``batch``: this minibatch's second moment replaces ``Lambda``;
- ``ema``: ``Lambda <- decay * Lambda + (1 - decay) * batch`` (the running average).

Basis change: ``reset``. The old ``Lambda`` belongs to the old basis and a second
moment cannot be rotated exactly, so it is re-estimated from the batch of the refresh
step (the core always captures there); until one is available (no capture, or a
non-finite one) K-FAC's ``b (x) a`` stands in on a ``kfac`` basis, and the squared
projected minibatch gradient on other bases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from pydantic import Field
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, Statistic, hookimpl


class EKFACConfig(RuleConfig):
    name: Literal["ekfac"] = "ekfac"
    estimator: Literal["batch", "ema"] = "ema"
    """``batch``: Lambda from the latest minibatch; ``ema``: running average."""
    decay: float = Field(0.95, ge=0, lt=1)
    """EMA decay of Lambda (``ema`` estimator only)."""
    damping_scale: Literal["absolute", "mean"] = "absolute"
    """``absolute``: add ``damping`` to Lambda; ``mean``: add ``damping * mean(Lambda)``
    of the block (scale-free per layer: every layer damped relative to its own Fisher;
    absolute for a block whose Lambda is all zero)."""


class EKFACState(NamedTuple):
    scale: Tensor | None = None
    """Lambda, shaped like the block's KFE coordinates; ``None`` after a reset."""


class EKFAC(Rule[EKFACConfig]):
    name = "ekfac"
    Config = EKFACConfig
    State = EKFACState
    needs = frozenset({Statistic.SQUARED_PROJECTIONS})
    policies = (BasisPolicy.RESET,)

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        scale, fresh = state.scale, ctx.squared_projections
        if fresh is not None:
            if scale is None or self.config.estimator == "batch":
                scale = fresh
            else:
                scale = scale.lerp(fresh, 1 - self.config.decay)
        denominator = self._stand_in(grad, ctx) if scale is None else ctx.with_prior(scale)
        damping: float | Tensor = ctx.damping
        if self.config.damping_scale == "mean":
            damping = ctx.relative_damping(denominator.mean())
        return grad / (denominator + damping), EKFACState(scale)

    def _stand_in(self, grad: Tensor, ctx: RuleContext) -> Tensor:
        """Until Lambda is estimated: K-FAC's ``b a^T`` if the basis has it, else ``M~^2``."""
        return ctx.eigenvalue_product() if ctx.eigenvalues is not None else grad.square()

    def reset(self, state: Any, like: Tensor, ctx: RuleContext) -> Any:
        return EKFACState(None)

    def diagonal(self, state: Any, ctx: RuleContext) -> Tensor | None:
        """``Lambda`` (per-example Fisher scale) with the prior's diagonal where there is
        one, or the stand-in ``b a^T`` after a reset."""
        if state.scale is None:
            return ctx.eigenvalue_product() if ctx.eigenvalues is not None else None
        return ctx.with_prior(state.scale)


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [EKFAC]
