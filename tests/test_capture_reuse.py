"""The projected gradient formed from the captures (``gradients_from_captures``).

When ``.grad`` is exactly the captured sum ``sum_p s_p g_p^T x_p``, the Lambda phase
hands the rule ``U_B^T grad U_A`` from the rotated captures instead of rotating ``grad``.
These tests check that the result equals the ``grad`` path, and that each way of making
``.grad`` differ from the captures sends the step down the ``grad`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer

DT = torch.float64
Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def train(
    registry: Any,
    reuse: bool,
    loss: Loss = plain,
    *,
    after_backward: Callable[[nn.Module], None] | None = None,
    zero_grad: bool = True,
    **settings: Any,
) -> tuple[list[torch.Tensor], KFEOptimizer]:
    """Six steps of ``ekfac`` (batch Lambda every step, refresh every 2) on a small MLP;
    ``reuse=False`` switches the captured-gradient path off (the reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(DT)
    config = {
        "rule": {"name": "ekfac", "estimator": "batch"},
        "lr": 0.05,
        "damping": 1e-2,
        "factor_every": 1,
        "basis_every": 2,
        "lambda_every": 1,
    }
    opt = KFEOptimizer(model, registry=registry, **{**config, **settings})
    if not reuse:
        opt._gradients_in_captures = lambda jobs: [False] * len(jobs)  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 5, generator=g, dtype=DT)
        if zero_grad or step == 0:
            opt.zero_grad()
        if opt.config.fisher == "true":
            out = model(x)
            opt.sample_fisher(out, "mse", torch.Generator().manual_seed(step))
            out.square().mean().backward()
        else:
            loss(model, x).backward()
        if after_backward is not None:
            after_backward(model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def assert_same_run(reused: list[torch.Tensor], rotated: list[torch.Tensor]) -> None:
    for a, b in zip(reused, rotated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def two_forwards(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return plain(model, x[:6]) + 0.5 * plain(model, x[6:])


def summed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().sum()


@pytest.mark.parametrize(
    ("loss", "settings"),
    [(plain, {}), (two_forwards, {}), (summed, {"batch_averaged": False, "lr": 1e-3})],
    ids=["batch mean", "two forwards, one backward", "summed loss"],
)
def test_reused_projection_equals_rotating_the_gradient(
    registry: Any, loss: Loss, settings: dict[str, Any]
) -> None:
    reused, opt = train(registry, True, loss, **settings)
    assert opt.gradients_from_captures == 12  # 2 blocks x 6 steps (first refresh: step 0)
    rotated, other = train(registry, False, loss, **settings)
    assert other.gradients_from_captures == 0
    assert_same_run(reused, rotated)


def clip(model: nn.Module) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


def extra_term(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return plain(model, x) + 1e-2 * model[0].weight.square().sum()


@pytest.mark.parametrize(
    ("case", "reused_blocks"),
    [
        ({"after_backward": clip}, 0),
        # only the block with the extra term is refused; the other one's grad is captured
        ({"loss": extra_term}, 6),
        ({"weight_decay": 1e-2, "weight_decay_style": "l2"}, 0),
        ({"fisher": "true"}, 0),
        # only the first step (zero_grad before it) has .grad equal to its captures
        ({"zero_grad": False}, 2),
    ],
    ids=[
        "clip_grad_norm_",
        "extra loss term on a weight",
        "l2 decay",
        "true Fisher",
        "grad accumulated over steps",
    ],
)
def test_anything_else_on_grad_sends_the_step_down_the_grad_path(
    registry: Any, case: dict[str, Any], reused_blocks: int
) -> None:
    reused, opt = train(registry, True, **case)
    assert opt.gradients_from_captures == reused_blocks
    rotated, _ = train(registry, False, **case)
    if reused_blocks:
        assert_same_run(reused, rotated)
    else:
        for a, b in zip(reused, rotated, strict=True):
            assert torch.equal(a, b)
