"""The torch.optim contract: param_groups, schedulers, closure, state_dict round trip."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 4),
    )


def data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model: nn.Module, opt: KFEOptimizer, steps: int, seed: int = 0) -> list[float]:
    x, y = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


SETTINGS = dict(
    lr=0.05,
    damping=1e-2,
    momentum=0.9,
    weight_decay=1e-3,
    factor_every=2,
    basis_every=3,
    lambda_every=2,
)


@pytest.mark.parametrize(
    ("rule", "extra"),
    [
        ("ekfac", {}),
        ({"name": "ekfac", "estimator": "batch"}, {}),
        ("ekfac", {"factor_init": (0.5, 2.0)}),  # the prior's weight travels too
        ("kfac", {}),
        ({"name": "kfac", "damping_mode": "split"}, {}),
        ("sgd", {}),
    ],
)
def test_resume_is_bit_exact_across_refresh(registry, rule, extra) -> None:
    settings = {**SETTINGS, **extra}
    torch.manual_seed(0)
    reference = make_model()
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_opt = KFEOptimizer(reference, rule=rule, registry=registry, **settings)
    train(reference, ref_opt, 10)

    first = make_model()
    first.load_state_dict(start)
    opt = KFEOptimizer(first, rule=rule, registry=registry, **settings)
    train(first, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = make_model()
    second.load_state_dict(saved["model"])
    opt2 = KFEOptimizer(second, rule=rule, registry=registry, **settings)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps_taken == 5
    train(second, opt2, 5)  # steps 5..9 include the refresh at step 6 and 9
    for (name, a), b in zip(
        reference.state_dict().items(), second.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_state_dict_roundtrip_keeps_factor_dtype(registry) -> None:
    model = make_model()
    opt = KFEOptimizer(model, registry=registry, **SETTINGS)
    train(model, opt, 3)
    state = opt.state_dict()
    opt2 = KFEOptimizer(model, registry=registry, **SETTINGS)
    opt2.load_state_dict(state)
    again = opt2.state_dict()
    assert again["kfe"] == state["kfe"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            other = again["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype
            elif isinstance(value, dict):
                for k, v in value.items():
                    assert (v is None and other[k] is None) or torch.equal(v, other[k])
            else:
                assert value == other


@pytest.mark.parametrize(
    ("saved", "loading", "words"),
    [
        ({"rule": "ekfac"}, {"rule": "adam"}, ["rule 'ekfac'", "rule 'adam'"]),
        ({"basis": "kfac"}, {"basis": "shampoo"}, ["basis 'kfac'", "basis 'shampoo'"]),
        ({"fallback": "sgd"}, {"fallback": "adam"}, ["fallback 'sgd'", "fallback 'adam'"]),
    ],
)
def test_state_of_another_rule_or_basis_is_refused_at_load(
    registry, saved: dict, loading: dict, words: list[str]
) -> None:
    """Such a state used to load and then fail mid-step (``AdamState`` given ekfac's
    ``scale``); the optimizer's state is left as it was."""
    model = make_model()
    opt = KFEOptimizer(model, registry=registry, **SETTINGS, **saved)
    train(model, opt, 3)
    other = KFEOptimizer(model, registry=registry, **SETTINGS, **loading)
    with pytest.raises(ValueError, match="loaded state dict holds the state of") as err:
        other.load_state_dict(opt.state_dict())
    assert all(w in str(err.value) for w in words), err.value
    assert not other.state


@pytest.mark.parametrize("basis", ["kfac", "shampoo", "identity"])
def test_state_of_another_width_is_refused_at_load(registry, basis: str) -> None:
    """Factors, basis and momentum must fit each layer: a wider model's state is refused
    naming the layer (it used to fail in the next step's matmul), and a state dict
    without the rule names (written before they were recorded) still loads."""
    rule = "adam" if basis != "kfac" else "ekfac"
    settings = {**SETTINGS, "rule": rule, "basis": basis}
    model = make_model()
    opt = KFEOptimizer(model, registry=registry, **settings)
    train(model, opt, 3)
    wide = make_model()
    wide[3], wide[4], wide[6] = nn.Linear(3 * 6 * 6, 9), nn.LayerNorm(9), nn.Linear(9, 4)
    with pytest.raises(ValueError, match="does not fit layer '3'"):
        KFEOptimizer(wide, registry=registry, **settings).load_state_dict(opt.state_dict())
    old = opt.state_dict()
    old["kfe"] = {"step": old["kfe"]["step"]}
    fresh = KFEOptimizer(model, registry=registry, **settings)
    fresh.load_state_dict(old)
    train(model, fresh, 1)


def test_lr_scheduler_drives_param_groups(registry) -> None:
    model = make_model()
    opt = KFEOptimizer(model, registry=registry, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = data()
    lrs = []
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])


def test_lr_zero_changes_nothing_and_closure_returns_loss(registry) -> None:
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    opt = KFEOptimizer(model, registry=registry, lr=0.0)
    x, y = data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.steps_taken == 3


def test_param_groups_and_frozen_layers(registry) -> None:
    model = make_model()
    model[0].requires_grad_(False)
    head = list(model[6].parameters())
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
    opt = KFEOptimizer(
        model, params=[{"params": rest}, {"params": head, "lr": 0.0}], registry=registry, lr=0.1
    )
    assert [b.name for b in opt.blocks] == ["3", "6"]
    frozen_head = [p.clone() for p in head]
    train(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(frozen_head, head, strict=True))


def test_weight_and_bias_in_different_groups_is_refused(registry) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="same group"):
        KFEOptimizer(
            model, params=[{"params": [model.weight]}, {"params": [model.bias]}], registry=registry
        )


def test_capture_only_on_statistic_steps(registry) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFEOptimizer(model, rule="kfac", registry=registry, factor_every=3, basis_every=6)
    seen = []
    x = torch.randn(5, 3)
    for _ in range(7):
        seen.append(opt.wants_statistics)
        opt.zero_grad()
        model(x).square().mean().backward()
        assert bool(opt.capture.captured[opt.blocks[0]].inputs) == seen[-1]
        opt.step()
    assert seen == [True, False, False, True, False, False, True]


def test_bias_updates_when_weight_has_no_grad(registry) -> None:
    model = nn.Linear(3, 2)
    opt = KFEOptimizer(model, rule="sgd", registry=registry, lr=1.0)
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad = None
    bias_before, weight_before = model.bias.clone(), model.weight.clone()
    expected = bias_before - model.bias.grad
    opt.step()
    torch.testing.assert_close(model.bias, expected)
    torch.testing.assert_close(model.weight, weight_before)
