"""``kfac``: K-FAC as a diagonal in the KFE, ``Lambda = b (x) a``.

Damping modes:

- ``product`` (default): :math:`\\tilde D = \\tilde M \\oslash (b a^\\top + \\lambda)`,
  i.e. ``(A (x) B + lambda I)^{-1} grad``.
- ``split``: :math:`\\tilde D = \\tilde M \\oslash ((b + \\lambda_B)(a + \\lambda_A)^\\top)`,
  i.e. ``((A + lambda_A I) (x) (B + lambda_B I))^{-1} grad``, with Martens and Grosse's
  (2015, §6.3) ``pi = sqrt((tr A / dim A) / (tr B / dim B))``, ``lambda_A = pi sqrt(lambda)``,
  ``lambda_B = sqrt(lambda) / pi`` (``pi = 1`` with ``pi_correction=False``).
  The diagonal is an outer product, so the update is applied in parameter space as
  ``(B + lambda_B I)^{-1} G (A + lambda_A I)^{-1}``: two matmuls by inverses cached
  at the first step of each basis (recomputed if the damping changes) instead of four
  rotations.

Basis change: no KFE-coordinate state (``reset``; the inverse cache is rebuilt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from kfe import BasisPolicy, Rule, RuleConfig, RuleContext, Statistic, hookimpl
from kfe.basis import chain, pad_square


class KFACConfig(RuleConfig):
    name: Literal["kfac"] = "kfac"
    damping_mode: Literal["product", "split"] = "product"
    """``product``: damping added to ``b a^T``; ``split``: split between the factors."""
    pi_correction: bool = True
    """Split damping by Martens and Grosse's pi (``split`` mode only)."""
    damping_scale: Literal["absolute", "mean"] = "absolute"
    """``absolute``: ``damping`` as given; ``mean``: ``damping * mean(b) mean(a)`` of the
    block (scale-free per layer); split, that is ``sqrt(damping)`` times each factor's
    mean eigenvalue (pi-corrected; ``pi_correction`` then has no effect). A factor or
    product whose mean is zero (a dead block) is damped absolutely."""


class KFACState(NamedTuple):
    inv_B: Tensor | None = None
    """``(B + lambda_B I)^{-1}``, cached for the ``split`` mode (zero-padded)."""
    inv_A: Tensor | None = None
    """``(A + lambda_A I)^{-1}``, cached for the ``split`` mode (zero-padded)."""
    damping: float = math.nan
    """The damping the cache was built with."""


class KFAC(Rule[KFACConfig]):
    name = "kfac"
    Config = KFACConfig
    State = KFACState
    needs = frozenset({Statistic.EIGENVALUES})
    policies = (BasisPolicy.RESET,)  # no KFE-coordinate state; the cache is rebuilt

    def split_damping(self, ctx: RuleContext) -> tuple[float | Tensor, float | Tensor]:
        """``(lambda_B, lambda_A)`` for the ``split`` mode."""
        assert ctx.eigenvalues is not None
        b, a = ctx.eigenvalues
        root = math.sqrt(ctx.damping)
        if self.config.damping_scale == "mean":
            return ctx.relative_damping(b.mean(), root), ctx.relative_damping(a.mean(), root)
        pi = 1.0
        if self.config.pi_correction:
            mean_a, mean_b = a.mean().item(), b.mean().item()
            if mean_a > 0 and mean_b > 0:
                pi = math.sqrt(mean_a / mean_b)
        return root / pi, root * pi

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        b, a = ctx.eigenvalues or (None, None)
        assert a is not None and b is not None
        if self.config.damping_mode == "product":
            damping: float | Tensor = ctx.damping
            if self.config.damping_scale == "mean":
                damping = ctx.relative_damping(b.mean() * a.mean())
            return grad / (torch.outer(b, a) + damping), state
        d_b, d_a = self.split_damping(ctx)
        return grad / torch.outer(b + d_b, a + d_a), state

    def on_refresh(self, state: Any, ctx: RuleContext) -> Any:
        """Drop the inverse cache of the old basis: :meth:`precondition` rebuilds it on
        first use (never, where the core takes the KFE path under ``matmul_dtype``)."""
        return KFACState() if self.config.damping_mode == "split" else state

    def _inverses(self, ctx: RuleContext) -> KFACState:
        """``(B + lambda_B I)^{-1}``, ``(A + lambda_A I)^{-1}`` from the current basis."""
        assert ctx.basis is not None and ctx.eigenvalues is not None
        (U_B, U_A), (b, a) = ctx.basis, ctx.eigenvalues
        d_b, d_a = self.split_damping(ctx)
        inv_B = pad_square((U_B / (b + d_b)) @ U_B.mT)
        inv_A = pad_square((U_A / (a + d_a)) @ U_A.mT)
        return KFACState(inv_B, inv_A, ctx.damping)

    def precondition(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any] | None:
        if self.config.damping_mode != "split":
            return None
        if state.inv_B is None or state.damping != ctx.damping:
            state = self._inverses(ctx)
        return chain(state.inv_B, grad, state.inv_A), state

    def diagonal(self, state: Any, ctx: RuleContext) -> Tensor | None:
        """``b a^T``: the factor eigenvalues of the last refresh (stale until the next),
        on the per-example Fisher scale. Without damping in either mode."""
        return ctx.eigenvalue_product() if ctx.eigenvalues is not None else None


@hookimpl
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    return [KFAC]
