"""Inspection API: the curvature the optimizer holds for one tracked layer.

Dense matrices here act on the *row-major* flattening of the block matrix
``W_aug = [W | b]`` of shape ``(d_out, d_in+1)``, i.e. ``W_aug.reshape(-1)``, the order
``torch.func`` per-example gradients have when stacked the same way. In that order

.. math::

    F_{\\text{K-FAC}} = B \\otimes A, \\qquad
    F_{\\text{KFE}} = (U_B \\otimes U_A)\\, \\mathrm{diag}(\\mathrm{vec}\\,\\Lambda)\\,
    (U_B \\otimes U_A)^\\top .

Only for small layers: :meth:`LayerCurvature.dense` refuses above ``max_params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kfe import state_keys as K
from kfe.basis import Eigenbasis

if TYPE_CHECKING:
    from kfe.optimizer import KFEOptimizer

__all__ = ["DENSE_MAX_PARAMS", "LayerCurvature", "inspect_layer"]

DENSE_MAX_PARAMS = 4096


@dataclass(frozen=True)
class LayerCurvature:
    """A snapshot of one layer's curvature state (tensors are the optimizer's own).

    Attributes:
        name: the module name.
        A: EMA input factor ``E[x x^T]`` (bias coordinate last), or ``None`` before
            the first capture.
        B: EMA output-gradient factor ``E[g g^T]``, or ``None``.
        basis: ``U_A, a, U_B, b`` of the last successful refresh.
        diagonal: the rule's curvature diagonal in the KFE (EKFAC's ``Lambda``,
            K-FAC's ``b a^T``), or ``None`` for a rule without one (``sgd``).
        eigh_failures: refreshes that failed and kept the previous basis.
    """

    name: str
    A: Tensor | None
    B: Tensor | None
    basis: Eigenbasis
    diagonal: Tensor | None
    eigh_failures: int

    @property
    def num_params(self) -> int:
        return self.basis.U_B.shape[0] * self.basis.U_A.shape[0]

    def _check_size(self, max_params: int) -> None:
        if not isinstance(max_params, int) or isinstance(max_params, bool):
            raise TypeError(f"max_params: must be an int, not {max_params!r}")
        if self.num_params > max_params:
            raise ValueError(
                f"layer {self.name!r} has {self.num_params} parameters; dense blocks are "
                f"limited to max_params={max_params}"
            )

    def kronecker(self, max_params: int = DENSE_MAX_PARAMS) -> Tensor:
        """The dense K-FAC block ``B (x) A`` from the EMA factors."""
        self._check_size(max_params)
        if self.A is None or self.B is None:
            raise ValueError(f"layer {self.name!r} has no factors yet (no step taken)")
        return torch.kron(self.B, self.A)

    def dense(self, max_params: int = DENSE_MAX_PARAMS) -> Tensor:
        """The dense approximate Fisher block ``U diag(Lambda) U^T`` of the rule."""
        self._check_size(max_params)
        if self.diagonal is None:
            raise ValueError(f"layer {self.name!r}: the rule defines no curvature diagonal")
        U = torch.kron(self.basis.U_B, self.basis.U_A)
        return (U * self.diagonal.reshape(-1)) @ U.mT


def inspect_layer(optimizer: KFEOptimizer, layer: str | nn.Module) -> LayerCurvature:
    """The curvature ``optimizer`` holds for ``layer`` (a module name or the module)."""
    block = optimizer.block(layer)
    st = optimizer.state[block.weight]
    if not st:
        raise ValueError(f"layer {block.name!r} has no state yet: take a step first")
    ctx = optimizer.rule_context(block)
    rule_state = optimizer.rule.state_from_dict(st[K.RULE])
    return LayerCurvature(
        name=block.name,
        A=st.get(K.FACTOR_A),
        B=st.get(K.FACTOR_B),
        basis=Eigenbasis(**st[K.BASIS]),
        diagonal=optimizer.rule.diagonal(rule_state, ctx),
        eigh_failures=int(st[K.EIGH_FAILURES]),
    )
