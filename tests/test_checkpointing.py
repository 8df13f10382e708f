"""Activation checkpointing (``torch.utils.checkpoint``): the same steps as without it.

Checkpointing runs a region's forward again inside the backward pass. kfe must capture
each forward once: the original one when it was recorded (non-reentrant), the
recomputation when the original ran under ``no_grad`` (reentrant). The tests compare
parameters after several steps, with every cadence in play, against the same model
without checkpointing, bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfe import KFEOptimizer

SETTINGS = dict(lr=0.1, damping=0.1, factor_every=2, basis_every=4, lambda_every=2)


class Net(nn.Module):
    """Two tracked layers inside a checkpointed region, one after it."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.head(self.body(x))
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


class SharedNet(nn.Module):
    """A tracked layer used twice inside the checkpointed region (weight sharing)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.head(self.body(x))
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # reentrant checkpointing needs an input that requires grad to produce any gradient
    return torch.randn(32, 8, generator=g).requires_grad_(), torch.randint(0, 4, (32,), generator=g)


def train(
    reentrant: bool | None,
    rule: Any = "ekfac",
    fisher: str = "empirical",
    micro: int = 1,
    net: type[nn.Module] = Net,
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = net(reentrant)
    opt = KFEOptimizer(model, rule=rule, fisher=fisher, **SETTINGS)
    gen = torch.Generator().manual_seed(2)
    x, y = data()
    for _ in range(6):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
            out = model(xb)
            if fisher == "true":
                opt.sample_fisher(out, "cross_entropy", generator=gen)
            (nn.functional.cross_entropy(out, yb) / micro).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


RULES = [
    pytest.param("ekfac", id="ekfac-ema"),
    pytest.param({"name": "ekfac", "estimator": "batch"}, id="ekfac-batch"),
    pytest.param("kfac", id="kfac"),
]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("rule", RULES)
def test_empirical_fisher_equals_no_checkpointing(reentrant: bool, rule: Any) -> None:
    assert_same(train(reentrant, rule), train(None, rule))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_accumulated_micro_batches_equal_no_checkpointing(reentrant: bool) -> None:
    assert_same(train(reentrant, micro=2), train(None, micro=2))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_layer_used_twice_in_the_region(reentrant: bool) -> None:
    assert_same(train(reentrant, net=SharedNet), train(None, net=SharedNet))


def test_true_fisher_non_reentrant_equals_no_checkpointing() -> None:
    assert_same(train(False, fisher="true"), train(None, fisher="true"))


def test_true_fisher_reentrant_says_it_cannot_see_the_region() -> None:
    with pytest.warns(RuntimeWarning, match="use_reentrant=False"):
        train(True, fisher="true")


def test_recomputation_is_not_held_until_the_step() -> None:
    """Non-reentrant: the region's recomputed inputs are not stored beside the original
    ones (that would hold a second copy of the activations checkpointing freed)."""
    model = Net(reentrant=False)
    opt = KFEOptimizer(model, rule="ekfac", **SETTINGS)
    x, y = data()
    assert opt.wants_statistics
    nn.functional.cross_entropy(model(x), y).backward()
    stored = {b.name: len(opt.capture.captured[b].inputs) for b in opt.capture.blocks}
    assert stored == {"body.0": 1, "body.2": 1, "head": 1}
    opt.step()
