"""A new layer type is one plugin: a Conv1d adapter, with no edit to the core."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from kfe import KFEOptimizer, LayerAdapter, hookimpl, inspect_layer, load_registry
from tests.conftest import BUILTIN_PLUGINS


class Conv1dAdapter(LayerAdapter):
    """The example of docs/plugins.md."""

    module_type = nn.Conv1d

    def supports(self, module):
        return None if module.groups == 1 else "groups != 1"

    def inputs(self, module, x):
        patches = nn.functional.unfold(
            x.unsqueeze(-1),
            (module.kernel_size[0], 1),
            padding=(module.padding[0], 0),
            stride=(module.stride[0], 1),
        )
        return rearrange(patches, "n d l -> n l d")

    def output_grads(self, module, grad):
        return rearrange(grad, "n o l -> n l o")


class Conv1dPlugin:
    @hookimpl
    def kfe_layer_adapters(self):
        return [Conv1dAdapter()]


def test_conv1d_plugin_is_tracked_and_its_factors_are_exact() -> None:
    registry = load_registry([*BUILTIN_PLUGINS, Conv1dPlugin()])
    conv = nn.Conv1d(2, 3, kernel_size=3, padding=1, stride=2).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4, 2).double())
    opt = KFEOptimizer(model, rule="ekfac", registry=registry, lr=0.0)
    assert [b.name for b in opt.blocks] == ["0", "2"]
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    model[2](model[1](out)).square().mean().backward()
    opt.step()
    # brute force: patch t of example i is x[i, :, 2t-1 : 2t+2] (zero padded)
    padded = nn.functional.pad(x, (1, 1))
    patches = torch.stack([padded[:, :, 2 * t : 2 * t + 3] for t in range(4)], 1)
    xs = torch.cat([patches.reshape(5, 4, 6), torch.ones(5, 4, 1, dtype=x.dtype)], -1)
    gs = out.grad.transpose(1, 2) * 5
    layer = inspect_layer(opt, conv)
    torch.testing.assert_close(layer.A, torch.einsum("nti,ntj->ij", xs, xs) / 20)
    torch.testing.assert_close(layer.B, torch.einsum("nti,ntj->ij", gs, gs) / 5)


def test_unregistered_layer_type_goes_to_fallback(registry) -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    opt = KFEOptimizer(model, registry=registry)
    assert [b.name for b in opt.blocks] == ["2"]
    model(torch.randn(4, 2, 6)).sum().backward()
    before = model[0].weight.clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
