"""Layer adapter for ``nn.Linear`` on inputs with any leading dims.

``(n, d)`` is one position per example; ``(n, T, d)`` (or more leading dims) are
``T`` positions sharing the weight, flattened after the batch dim.
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

from kfe import LayerAdapter, hookimpl


class LinearAdapter(LayerAdapter):
    module_type = nn.Linear

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        return rearrange(x, "n ... d -> n (...) d")

    def output_grads(self, module: nn.Module, grad: Tensor) -> Tensor:
        return rearrange(grad, "n ... d -> n (...) d")


@hookimpl
def kfe_layer_adapters() -> Sequence[LayerAdapter]:
    return [LinearAdapter()]
