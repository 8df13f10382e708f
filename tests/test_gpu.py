"""CUDA: the same steps on the GPU as on the CPU (skipped where no CUDA device is visible)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
