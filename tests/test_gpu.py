"""CUDA: the same steps on the GPU as on the CPU, and TF32 scoping (GPU cases skipped where
no CUDA device is visible; the TF32 scoping check also runs on the CPU)."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kfe import KFEOptimizer


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rule", "basis"), [("ekfac", "kfac"), ("kfac", "kfac"), ("adam", "shampoo")]
)
def test_cuda_matches_cpu(registry, rule: str, basis: str) -> None:
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double().to(device)
        opt = KFEOptimizer(
            model, rule=rule, basis=basis, lr=1e-2, registry=registry, factor_every=1, basis_every=3
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            x = torch.randn(32, 6, generator=g, dtype=torch.float64).to(device)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert all(p.device.type == device for p in model.parameters())
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


class _CudaPrecision(TorchDispatchMode):
    """The CUDA float32 matmul precision in force at each matmul-family op."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm"):
            self.seen[torch.backends.cuda.matmul.fp32_precision] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("rule", ["ekfac", {"name": "kfac", "damping_mode": "split"}])
def test_tf32_is_scoped_and_close_to_float32(registry, rule: Any, device: str) -> None:
    """``fp32_matmul_precision="tf32"``: the step's lowered matmuls (Lambda, rotations,
    ``kfac`` split's shortcut) run under CUDA's ``tf32``, the setting is restored after
    each step, and parameters stay within TF32's rounding (10 significant bits) of
    float32's. On the CPU (which has no TF32 here) the same scoping is checked and the
    results agree as well."""
    results, seen = {}, {}
    for precision in ("ieee", "tf32"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32)).to(device)
        opt = KFEOptimizer(
            model,
            rule=rule,
            lr=1e-2,
            damping=1e-1,
            registry=registry,
            factor_every=2,
            basis_every=4,
            lambda_every=1,
            fp32_matmul_precision=precision,
        )
        g = torch.Generator().manual_seed(1)
        for step in range(7):
            x = torch.randn(256, 64, generator=g).to(device)
            opt.zero_grad()
            model(x).square().mean().backward()
            if step == 5:  # no factors, no refresh: Lambda, rotations or the shortcut
                seen[precision] = _CudaPrecision()
                with seen[precision]:
                    opt.step()
            else:
                opt.step()
            assert torch.backends.cuda.matmul.fp32_precision == "none"
        results[precision] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert set(seen["tf32"].seen) == {"tf32"} and set(seen["ieee"].seen) == {"ieee"}
    torch.testing.assert_close(results["tf32"], results["ieee"], rtol=2e-2, atol=1e-4)
