"""K-FAC's KL clipping: every direction scaled by nu = min(1, sqrt(kappa / sum lr^2 <D, g>))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer


def deltas(kl_clip: float | None, rule: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    model = model.double()
    opt = KFEOptimizer(
        model, rule=rule, lr=0.3, damping=0.1, factor_every=1, basis_every=1, kl_clip=kl_clip
    )
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], grads


@pytest.mark.parametrize("rule", ["kfac", "ekfac"])
def test_kl_clip_scales_every_direction_by_nu(rule: str) -> None:
    free, grads = deltas(None, rule)
    # lr * D = free delta, so lr^2 <D, g> = lr * <delta, g>
    quadratic = sum(0.3 * (d * g).sum() for d, g in zip(free, grads, strict=True))
    kappa = float(quadratic) / 16
    clipped, _ = deltas(kappa, rule)
    nu = (kappa / quadratic) ** 0.5
    assert 0 < nu < 1
    for c, f in zip(clipped, free, strict=True):
        torch.testing.assert_close(c, nu * f, rtol=1e-10, atol=1e-14)
    loose, _ = deltas(float(quadratic) * 4, rule)  # nu capped at 1: no change at all
    for a, f in zip(loose, free, strict=True):
        assert torch.equal(a, f)


def test_kl_clip_round_trips_in_config() -> None:
    model = nn.Linear(3, 2)
    opt = KFEOptimizer(model, rule="kfac", kl_clip=1e-3)
    assert opt.config.kl_clip == 1e-3
    assert copy.deepcopy(opt.config) == opt.config
    with pytest.raises(ValueError, match="kl_clip"):
        KFEOptimizer(model, rule="kfac", kl_clip=-1.0)
