"""Basis sources: where the two Kronecker factors of a block come from.

A source turns one step's data into batch factors ``(A, B)``, input side and output
side, that the core folds into EMAs and eigendecomposes on the refresh cadence:

- ``kfac`` (hooks): ``A = E[x x^T]``, ``B = E[g g^T]`` from captured layer inputs and
  pre-activation gradients (:mod:`kfe.statistics`);
- ``shampoo`` (gradients): ``A = G^T G``, ``B = G G^T`` of the minibatch gradient, for
  any weight viewable as a matrix, no hooks;
- ``identity``: no factors; the basis stays the identity (parameter space).

Rules do not know which source made their basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

__all__ = ["BasisSource", "BasisSourceConfig"]


class BasisSourceConfig(BaseModel):
    """Base of every basis source's configuration; tag ``name`` as for rules."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )
    name: str


class BasisSource:
    """Makes batch Kronecker factors for a block. Subclass and register via a plugin.

    Class attributes:
        name: registry key; equals the ``Literal`` tag of :attr:`Config`.
        Config: the pydantic model of this source's fields.
        needs_capture: factors need the layer hooks' ``x`` and ``g`` (so only layers
            with an adapter get this basis).
        fisher_eigenvalues: the eigenvalues that come with the basis are those of
            Kronecker factors of the Fisher (``kfac``), so rules that divide by them
            (``Statistic.EIGENVALUES``) can use this basis. Shampoo's eigenvalues are of
            ``G G^T`` (squared-gradient scale, not curvature) and the identity has none.

    Override :attr:`covers_untracked` (a property, so it may read the config) to give a
    basis to parameters with no layer adapter but at least two dims, viewed as
    ``(shape[0], -1)``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BasisSourceConfig]]
    needs_capture: ClassVar[bool] = False
    fisher_eigenvalues: ClassVar[bool] = False

    def __init__(self, config: BasisSourceConfig) -> None:
        self.config = config

    @property
    def covers_untracked(self) -> bool:
        return False

    def batch_factors(
        self, grad: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor] | None:
        """``(A, B)`` of this step, or ``None`` when there is nothing to fold in.

        Args:
            grad: the block's minibatch gradient as ``(d_out, d_in[+1])``.
            pairs: this step's captured ``(x, g)`` (bias coordinate appended to ``x``);
                empty unless :attr:`needs_capture` and the step captured.
        """
        raise NotImplementedError
