"""Layer adapters: from a module's captured tensors to the ``x`` and ``g`` matrices.

A layer computes ``h = W x`` at each position ``t`` of each example ``i``. An adapter
says how a module type exposes that structure:

- :meth:`LayerAdapter.inputs`: the layer input as ``(n, T, d_in)`` (no bias column:
  the core appends the homogeneous coordinate when the layer has a bias);
- :meth:`LayerAdapter.output_grads`: the gradient w.r.t. the pre-activation as
  ``(n, T, d_out)``;
- :meth:`LayerAdapter.weight_matrix`: the weight viewed as ``(d_out, d_in)``, in the
  same column order as :meth:`inputs`.

New layer types are added by a plugin returning an adapter from the
``kfe_layer_adapters`` hook; the core is not edited.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["LayerAdapter"]


class LayerAdapter:
    """How one module type maps onto ``h = W x``. Subclass and register via a plugin.

    Class attributes:
        module_type: the ``nn.Module`` subclass this adapter handles (subclasses of it
            are handled too unless a more specific adapter is registered).
    """

    module_type: ClassVar[type[nn.Module]]

    def supports(self, module: nn.Module) -> str | None:
        """``None`` if the module can be tracked, else the reason it cannot."""
        return None

    def weight(self, module: nn.Module) -> nn.Parameter | None:
        """The layer's weight parameter, or ``None`` when the weight is computed (by
        ``torch.nn.utils.parametrize``: weight norm, spectral norm...): a gradient with
        respect to it belongs to no parameter, so the layer is not tracked."""
        if parametrize.is_parametrized(module, "weight"):
            return None
        weight = getattr(module, "weight", None)
        return weight if isinstance(weight, nn.Parameter) else None

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """View the weight (or its gradient) as ``(d_out, d_in)``."""
        return weight.reshape(weight.shape[0], -1)

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """The layer input as ``(n, T, d_in)``."""
        raise NotImplementedError

    def output_grads(self, module: nn.Module, grad: Tensor) -> Tensor:
        """The output gradient as ``(n, T, d_out)``."""
        raise NotImplementedError
