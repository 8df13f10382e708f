"""Layer adapter for ``nn.Conv2d`` (groups=1, zero padding): patches via ``F.unfold``.

Each output location is a position ``t``; its input is the ``(C_in * kh * kw)`` patch
in the channel-major order of ``weight.reshape(C_out, -1)``. Any kernel size, stride,
dilation and padding (including ``"same"`` with an even total, padded asymmetrically
as torch does) is supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kfe import LayerAdapter, hookimpl


class Conv2dAdapter(LayerAdapter):
    module_type = nn.Conv2d

    def supports(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            return "groups != 1"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return None

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.Conv2d)
        padding = module.padding
        if isinstance(padding, str):
            if padding == "same":
                pads: list[int] = []
                for k, d in reversed(list(zip(module.kernel_size, module.dilation, strict=True))):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = (0, 0)
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        return rearrange(patches, "n d l -> n l d")

    def output_grads(self, module: nn.Module, grad: Tensor) -> Tensor:
        return rearrange(grad, "n o h w -> n (h w) o")


@hookimpl
def kfe_layer_adapters() -> Sequence[LayerAdapter]:
    return [Conv2dAdapter()]
