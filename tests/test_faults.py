"""Numerics users hit: broken factors, failing eigh, non-finite gradients."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer, inspect_layer
from kfe import state_keys as K
from kfe.eigh import robust_eigh


def setup(registry, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = KFEOptimizer(model, registry=registry, lr=0.1, factor_every=1, basis_every=2, **kw)
    x, y = torch.randn(12, 4), torch.randn(12, 3)

    def step() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return model, opt, step


def test_nan_factor_keeps_previous_basis_and_warns_once(registry) -> None:
    model, opt, step = setup(registry, factor_decay=0.9)
    step()  # step 0: basis from clean factors
    first = inspect_layer(opt, "0").basis
    opt.state[model[0].weight][K.FACTOR_A][0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # refreshes at steps 2 and 4 both fail
            step()
    messages = [str(w.message) for w in caught if "eigendecomposition" in str(w.message)]
    assert len(messages) == 1 and "'0'" in messages[0]
    after = inspect_layer(opt, "0")
    assert after.eigh_failures == 2
    assert torch.equal(after.basis.U_A, first.U_A) and torch.equal(after.basis.U_B, first.U_B)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert inspect_layer(opt, "2").eigh_failures == 0  # other layers refresh normally


def test_eigh_failure_keeps_basis(registry, monkeypatch) -> None:
    model, opt, step = setup(registry)
    step()
    before = inspect_layer(opt, "2").basis

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="eigendecomposition failed"):
        step()
        step()
    after = inspect_layer(opt, "2")
    assert after.eigh_failures == 1
    assert torch.equal(after.basis.U_B, before.U_B)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_first_refresh_failure_falls_back_to_identity_basis(registry, monkeypatch) -> None:
    model, opt, step = setup(registry, rule="kfac", damping=0.5)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    before = model[2].weight.clone()
    with pytest.warns(RuntimeWarning, match="eigendecomposition failed"):
        step()
    # identity basis, unit eigenvalues: K-FAC's step is grad / (1 + damping)
    expected = before - 0.1 * model[2].weight.grad / 1.5
    torch.testing.assert_close(model[2].weight, expected)
    assert inspect_layer(opt, "2").eigh_failures == 1


def test_non_finite_gradient_never_reaches_parameters(registry) -> None:
    model, opt, step = setup(registry)
    step()
    before = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(12, 4)).sum().backward()
    model[2].bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.steps_taken == 1
    step()
    assert opt.steps_taken == 2


def test_robust_eigh_paths(monkeypatch) -> None:
    spd = torch.randn(5, 5)
    spd = spd @ spd.T
    w, V = robust_eigh(spd)
    torch.testing.assert_close((V * w) @ V.T, spd, atol=1e-4, rtol=1e-4)
    singular = torch.zeros(4, 4)
    w, V = robust_eigh(singular)
    assert torch.equal(w, torch.zeros(4)) and torch.isfinite(V).all()
    assert robust_eigh(torch.full((3, 3), float("nan"))) is None
    # float32 fails, float64 succeeds: the result comes back in float32
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("fp32 failure")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    w, V = robust_eigh(spd)
    assert calls == [torch.float32, torch.float64] and w.dtype == torch.float32
    # tiny negative eigenvalues of a PSD matrix are clamped at zero
    monkeypatch.setattr(torch.linalg, "eigh", real)
    u = torch.randn(4, 1, dtype=torch.float64)
    w, _ = robust_eigh(u @ u.T - 1e-12 * torch.eye(4, dtype=torch.float64))
    assert (w >= 0).all()


def test_robust_eigh_jitter_rescues(monkeypatch) -> None:
    real = torch.linalg.eigh
    spd = torch.eye(3, dtype=torch.float64)
    tries = []

    def fails_without_jitter(m):
        tries.append(m.clone())
        if len(tries) < 3:
            raise torch.linalg.LinAlgError("no")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", fails_without_jitter)
    w, _ = robust_eigh(spd)
    assert len(tries) == 3 and not torch.equal(tries[2], spd)  # third try is jittered
    assert torch.allclose(w, torch.ones(3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("fault", ["gradient", "factor", "scaler"])
def test_warnings_point_at_the_users_line(registry, fault: str) -> None:
    """A warning from inside ``step`` names the line that called ``opt.step()`` (or
    ``scaler.step(opt)``), not a frame of kfe or of torch's wrappers around ``step``."""
    model, opt, step = setup(registry)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step()
    opt.zero_grad()
    model(torch.randn(12, 4)).sum().backward()
    if fault == "gradient":
        model[2].bias.grad[0] = float("nan")
    else:  # a NaN factor: the refresh at step 2 fails
        opt.state[model[0].weight][K.FACTOR_A][0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        scaler.scale(model(torch.randn(12, 4)).sum()).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 2
        if fault == "scaler":
            scaler.step(opt, loss_scale=scaler.get_scale())
        else:
            opt.step()
    if fault != "scaler":
        line += 2
    assert caught, "no warning"
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)] * len(caught)
