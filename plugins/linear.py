"""Layer adapter for ``nn.Linear`` on inputs with any leading dims.

``(n, d)`` is one position per example; ``(n, T, d)`` (or more leading dims) are
``T`` positions sharing the weight, flattened after the batch dim.

``nn.MultiheadAttention``'s ``out_proj`` is refused: the attention multiplies by its
weight inside ``F.multi_head_attention_forward`` and never calls its forward, so hooks
would capture nothing. Its weight is then an untracked parameter (the fallback rule, or
a basis that covers untracked parameters, e.g. ``shampoo``).
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from kfe import LayerAdapter, hookimpl


class LinearAdapter(LayerAdapter):
    module_type = nn.Linear

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module, NonDynamicallyQuantizableLinear):
            return "nn.MultiheadAttention's out_proj (its forward is never called)"
        return None

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        return rearrange(x, "n ... d -> n (...) d")

    def output_grads(self, module: nn.Module, grad: Tensor) -> Tensor:
        return rearrange(grad, "n ... d -> n (...) d")


@hookimpl
def kfe_layer_adapters() -> Sequence[LayerAdapter]:
    return [LinearAdapter()]
