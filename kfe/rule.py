"""The diagonal-rule contract: projected gradient in, projected direction out.

A *rule* is the only thing that differs between EKFAC, K-FAC, SGD-in-KFE and every
optimizer a researcher adds. The core owns the pipeline (capture, factors, refresh,
project, rule, unproject, momentum, weight decay); a rule sees one block at a time in
KFE coordinates:

.. math::

    \\tilde M = U_B^\\top \\nabla_W \\mathcal L\\, U_A, \\qquad
    \\tilde D, s' = \\mathrm{rule}(\\tilde M, s, \\text{stats}), \\qquad
    \\Delta W = -\\eta\\, U_B \\tilde D U_A^\\top .

Each rule is a small class with a frozen pydantic config (its fields show up in
validation and JSON Schema), a typed ``NamedTuple`` state, and a declaration of the
statistics it needs (:class:`Statistic`) so that the core computes only those.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

__all__ = [
    "BasisPolicy",
    "Rule",
    "RuleConfig",
    "RuleContext",
    "Statistic",
]


class Statistic(str, enum.Enum):
    """Statistics a rule may ask the core to compute for it."""

    SQUARED_PROJECTIONS = "squared_projections"
    """``E_i[(U_B^T G_i U_A)^2]``: per-example second moment in the KFE (needs hooks)."""
    EIGENVALUES = "eigenvalues"
    """The eigenvalues ``(b, a)`` of the Fisher's Kronecker factors (a ``kfac`` basis).

    Handed to every rule whenever the basis has them (they cost nothing more); a rule
    that declares it *needs* them is refused on bases without them."""


class BasisPolicy(str, enum.Enum):
    """What happens to a rule's KFE-coordinate state when the basis changes."""

    RESET = "reset"
    """Re-initialise the state for the new basis (:meth:`Rule.reset`)."""
    ROTATE = "rotate"
    """Carry tensors over exactly: ``U_B'^T U_B M U_A^T U_A'`` (first moments only)."""
    KEEP = "keep"
    """Leave the numbers as they are (as Distributed Shampoo does)."""


class RuleConfig(BaseModel):
    """Base of every rule's configuration: frozen, unknown fields rejected.

    Subclasses declare ``name: Literal["myrule"] = "myrule"``, the tag of the
    discriminated union that :mod:`kfe.config` builds from the registered rules.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )
    name: str


@dataclass(frozen=True)
class RuleContext:
    """What the core hands a rule on each call, besides the gradient and its state.

    Attributes:
        group: the parameter group's hyperparameters (``lr``, ``damping``, ...), read
            every step so that schedulers can change them.
        eigenvalues: ``(b, a)``, the eigenvalues of the output- and input-side Fisher
            factors of the current basis, or ``None`` where the basis has none
            (``shampoo``, ``identity``, the parameter-space fallback).
        squared_projections: a fresh estimate of ``E_i[(U_B^T G_i U_A)^2]`` from this
            step's batch, or ``None`` on steps that do not update it.
        basis: the current ``(U_B, U_A)``, or ``None`` for the fallback; for rules that
            precompute parameter-space operators at a refresh.
        prior: ``(s_B, s_A)``, the scaled identities that ``factor_init`` still
            contributed to the two factors when this basis was computed (so ``b - s_B``
            and ``a - s_A`` are the data's eigenvalues), or ``None`` (no ``factor_init``,
            no eigenvalues, or the identity basis before the first refresh).
    """

    group: Mapping[str, Any]
    eigenvalues: tuple[Tensor, Tensor] | None = None
    squared_projections: Tensor | None = None
    basis: tuple[Tensor, Tensor] | None = None
    prior: tuple[float, float] | None = None

    @property
    def damping(self) -> float:
        """Tikhonov damping of the current parameter group."""
        return float(self.group["damping"])

    def relative_damping(self, scale: Tensor, damping: float | None = None) -> Tensor:
        """``damping * scale`` for damping relative to a block's curvature scale (a mean
        eigenvalue, a mean of Lambda), or the absolute ``damping`` where ``scale`` is
        zero: a dead block (all-zero curvature, zero gradient) has no scale to be
        relative to, and its ``0 / 0`` would reach the parameters (and, through KL
        clipping's common factor, every other block). ``damping`` defaults to the
        group's. Stays on the device."""
        damping = self.damping if damping is None else damping
        return torch.where(scale > 0, scale * damping, damping)

    def eigenvalue_product(self) -> Tensor:
        """K-FAC's diagonal in the KFE, ``Lambda[j, k] = b_j * a_k``."""
        if self.eigenvalues is None:
            raise RuntimeError("this rule did not declare Statistic.EIGENVALUES")
        b, a = self.eigenvalues
        return torch.outer(b, a)

    def with_prior(self, diagonal: Tensor) -> Tensor:
        """``diagonal`` plus the prior's part of K-FAC's diagonal (in one new tensor), or
        ``diagonal`` itself without a :attr:`prior`.

        With ``factor_init`` the factors are ``A = A_d + s_A I`` and ``B = B_d + s_B I``
        (``A_d``, ``B_d`` the data's EMAs), so the Kronecker model splits as

        .. math::

            A \\otimes B = A_d \\otimes B_d
                + \\big(s_A I \\otimes B_d + s_B A_d \\otimes I + s_A s_B I\\big),

        and the bracket is diagonal in the KFE:
        ``s_A b_d[j] + s_B a_d[k] + s_A s_B`` with ``b_d = b - s_B``, ``a_d = a - s_A``
        (clamped at zero against round-off). EKFAC re-estimates the data term's
        diagonal (Lambda) and keeps this one: ``ctx.with_prior(Lambda)``.
        """
        if self.prior is None or self.eigenvalues is None:
            return diagonal
        (b, a), (s_B, s_A) = self.eigenvalues, self.prior
        data_b = (b - s_B).clamp(min=0)
        data_a = (a - s_A).clamp(min=0)
        prior = (data_b * s_A).unsqueeze(1) + (data_a * s_B + s_A * s_B).unsqueeze(0)
        return prior.add_(diagonal)


ConfigT = TypeVar("ConfigT", bound=RuleConfig)
StateT = TypeVar("StateT", bound=NamedTuple)


class Rule(Generic[ConfigT]):
    """A diagonal rule in the KFE. Subclass, set the class attributes, register.

    Class attributes:
        name: registry key; equals the ``Literal`` tag of :attr:`Config`.
        Config: the pydantic model of this rule's own fields.
        State: a ``NamedTuple`` of tensors (or ``None`` fields); saved in
            ``optimizer.state`` as a plain dict so ``state_dict`` stays loadable with
            ``torch.load(weights_only=True)``.
        needs: the statistics the core must compute for this rule.
        policies: the basis-change policies this rule supports; the first is the default.
        rotatable: the ``State`` fields that :attr:`BasisPolicy.ROTATE` carries over
            (first moments; a second moment is not a vector in the KFE and cannot be
            rotated exactly).

    Methods to override: :meth:`init`, :meth:`update`, and optionally :meth:`reset`,
    :meth:`precondition` (a parameter-space shortcut) and :meth:`diagonal`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[RuleConfig]]
    State: ClassVar[type[Any]]
    needs: ClassVar[frozenset[Statistic]] = frozenset()
    policies: ClassVar[tuple[BasisPolicy, ...]] = (BasisPolicy.KEEP,)
    rotatable: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @property
    def policy(self) -> BasisPolicy:
        """The basis-change policy in force (a ``basis_policy`` config field, if any)."""
        chosen = getattr(self.config, "basis_policy", None)
        return BasisPolicy(chosen) if chosen is not None else self.policies[0]

    def init(self, like: Tensor) -> Any:
        """Fresh state for a block whose KFE-coordinate gradient looks like ``like``."""
        return self.State()

    def update(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any]:
        """Map the projected gradient to a projected direction; return the new state."""
        raise NotImplementedError

    def reset(self, state: Any, like: Tensor, ctx: RuleContext) -> Any:
        """State after a basis change under :attr:`BasisPolicy.RESET`."""
        return self.init(like)

    def precondition(self, grad: Tensor, state: Any, ctx: RuleContext) -> tuple[Tensor, Any] | None:
        """Optional parameter-space shortcut for the whole ``project, update, unproject``.

        A rule whose diagonal is an outer product can apply cached factor inverses with
        two matmuls instead of four. Return ``(direction, new_state)`` in parameter
        space, or ``None`` (the default) to use the KFE path. It must give the KFE
        path's direction. With ``matmul_dtype`` set the core does not call it: its
        operators are the rule's own state in the parameters' dtype, which the lowered
        dtype does not reach, and the lowered KFE path is faster. Under
        ``fp32_matmul_precision`` it is called inside the lowered block.
        """
        return None

    def on_refresh(self, state: Any, ctx: RuleContext) -> Any:
        """Hook called after every basis refresh (after the policy), e.g. to cache inverses."""
        return state

    def diagonal(self, state: Any, ctx: RuleContext) -> Tensor | None:
        """The rule's curvature diagonal in KFE coordinates, shape ``(d_out, d_in+1)``, or
        ``None`` (the default) for a rule without one (``sgd``, ``signsgd``).

        ``Lambda`` such that the rule's implied Fisher block is
        ``(U_B (x) U_A) diag(vec Lambda) (U_B (x) U_A)^T`` (row-major ``vec``): EKFAC's
        ``E_i[(U_B^T G_i U_A)^2]``, K-FAC's ``b a^T``, a second-moment EMA for
        RMSProp/Adam. Optional; read (never written) by the inspection API
        (:func:`kfe.inspect_layer`) and the curvature diagnostics (:mod:`kfe.diagnostics`),
        which compare it with the exact Fisher block. Document its scale: a moment of
        the *minibatch-mean* gradient is about ``1/n`` times the per-example Fisher one.
        """
        return None

    # -- state (de)serialisation: plain dicts in optimizer.state -------------------

    def state_to_dict(self, state: Any) -> dict[str, Any]:
        return dict(state._asdict())

    def state_from_dict(self, data: Mapping[str, Any]) -> Any:
        return self.State(**data)
