"""Mixed precision: captures under ``torch.autocast`` and loss scaling by a ``GradScaler``.

Under autocast a layer sees and returns low-precision tensors (its input ``x`` and the
gradient ``g`` of its output are bfloat16 here) while ``.grad`` stays in the parameter's
dtype; the optimizer casts the captures. A ``GradScaler`` multiplies the loss by its
scale ``S`` and unscales ``.grad`` before the step, but the captured ``g`` carry ``S``
until ``step(loss_scale=S)`` divides it out.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kfe

RULES: list[Any] = ["ekfac", {"name": "ekfac", "estimator": "batch"}, "kfac", "adam"]
SCHEDULE = dict(factor_every=1, basis_every=2, lambda_every=1)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
    )


def test_autocast_factors_are_the_explicit_sums_of_the_low_precision_captures() -> None:
    """One statistics step under bfloat16 autocast: ``A`` and ``B`` of each layer equal
    explicit float64 sums over the tensors the layer saw (``x`` as the module's input,
    bfloat16 after the first layer; ``g`` bfloat16), and the state is float32."""
    model = mlp()
    opt = kfe.KFEOptimizer(model, rule="ekfac", lr=1e-2, **SCHEDULE)
    seen: dict[int, dict[str, Tensor]] = {0: {}, 2: {}}

    def keep(index: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen[index]["x"] = args[0].detach()
            out.register_hook(lambda g: seen[index].__setitem__("g", g.detach()))

        return hook

    for i in seen:
        model[i].register_forward_hook(keep(i))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    ((out.float() - y) ** 2).mean().backward()
    assert seen[2]["x"].dtype == torch.bfloat16 and seen[2]["g"].dtype == torch.bfloat16
    opt.step()

    n = x.shape[0]
    for i, data in seen.items():
        xa = torch.cat([data["x"].double(), torch.ones(n, 1, dtype=torch.float64)], 1)
        g = data["g"].double() * n  # per-example: the mean loss's g times n
        cur = kfe.inspect_layer(opt, str(i))
        assert cur.A is not None and cur.B is not None
        assert cur.A.dtype == torch.float32 and cur.B.dtype == torch.float32
        torch.testing.assert_close(cur.A.double(), xa.T @ xa / n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cur.B.double(), g.T @ g / n, rtol=1e-5, atol=1e-6)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r if isinstance(r, str) else "ekfac-batch")
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("build", [mlp, convnet], ids=["mlp", "conv"])
def test_autocast_training_keeps_float32_state(rule: Any, fisher: str, build: Any) -> None:
    """Steps across refreshes under bfloat16 autocast (both Fisher kinds, Linear and
    Conv2d): parameters and every state tensor stay float32 and finite, and the loss
    falls."""
    model = build()
    opt = kfe.KFEOptimizer(model, rule=rule, lr=1e-2, damping=1e-2, fisher=fisher, **SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 6) if build is convnet else torch.randn(16, 6)
    y = torch.randn(16, 3)
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        if fisher == "true" and opt.wants_statistics:
            opt.sample_fisher(out, "mse", gen)
        loss = ((out.float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
    tensors = [t for st in opt.state.values() for t in _tensors(st)]
    assert tensors and all(t.dtype in (torch.float32, torch.int64) for t in tensors)
    assert all(t.isfinite().all() for t in tensors if t.is_floating_point())


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _train(
    rule: Any, fisher: str, scale: float | None, pass_scale: bool, steps: int = 4
) -> tuple[nn.Sequential, kfe.KFEOptimizer]:
    """``steps`` steps; with ``scale`` the loss goes through a ``GradScaler`` of that scale."""
    model = mlp()
    opt = kfe.KFEOptimizer(model, rule=rule, lr=1e-2, damping=1e-3, fisher=fisher, **SCHEDULE)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    gen = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=data)
        y = torch.randn(32, 3, generator=data)
        out = model(x)
        if fisher == "true" and opt.wants_statistics:
            opt.sample_fisher(out, "mse", gen)
        loss = ((out - y) ** 2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            kwargs = {"loss_scale": scaler.get_scale()} if pass_scale else {}
            scaler.step(opt, **kwargs)
            scaler.update()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r if isinstance(r, str) else "ekfac-batch")
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_grad_scaler_with_loss_scale_equals_unscaled_training(rule: Any, fisher: str) -> None:
    """A power-of-two loss scale is exact in floating point, so training through a
    ``GradScaler`` with ``loss_scale`` passed equals training without one bit for bit:
    parameters and factors (the true Fisher's captures come unscaled from
    ``sample_fisher`` and are left alone)."""
    plain, plain_opt = _train(rule, fisher, None, False)
    scaled, scaled_opt = _train(rule, fisher, 2.0**12, True)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in ("0", "2"):
        a, b = kfe.inspect_layer(plain_opt, name), kfe.inspect_layer(scaled_opt, name)
        assert a.B is not None and b.B is not None
        assert torch.equal(a.B, b.B)


def test_grad_scaler_without_loss_scale_inflates_the_captured_curvature() -> None:
    """The control: without ``loss_scale`` the captured ``g`` keep the scale, so ``B``
    of the first step comes out ``S^2`` times too large (what the argument undoes)."""
    _, plain = _train("ekfac", "empirical", None, False, steps=1)
    _, unaware = _train("ekfac", "empirical", 2.0**12, False, steps=1)
    a, b = kfe.inspect_layer(plain, "2"), kfe.inspect_layer(unaware, "2")
    assert a.B is not None and b.B is not None
    assert torch.equal(b.B, a.B * 2.0**24)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_loss_scale_must_be_positive_and_finite(bad: float) -> None:
    model = mlp()
    opt = kfe.KFEOptimizer(model, rule="ekfac", lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    with pytest.raises(ValueError, match="loss_scale"):
        opt.step(loss_scale=bad)


@pytest.mark.parametrize("rule", RULES[:3], ids=["ekfac", "ekfac-batch", "kfac"])
def test_accumulation_over_scaled_micro_batches_equals_one_batch(rule: Any) -> None:
    """Gradient accumulation as usually written, ``(loss / k).backward()`` on each of
    ``k`` micro-batches, with ``step(loss_scale=1 / k)``: the same factors, Lambda and
    parameters as one step on the whole batch (the captured ``g`` carry the ``1/k``)."""
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    results = []
    for k in (1, 4):
        model = mlp().double()
        opt = kfe.KFEOptimizer(model, rule=rule, lr=1e-2, damping=1e-3, **SCHEDULE)
        for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
            (((model(xb) - yb) ** 2).mean() / k).backward()
        opt.step(loss_scale=1 / k)
        layer = kfe.inspect_layer(opt, "2")
        results.append((list(model.parameters()), layer.A, layer.B, layer.diagonal))
    (p1, A1, B1, L1), (p4, A4, B4, L4) = results
    for a, b in [(A1, A4), (B1, B4), *zip(p1, p4, strict=True)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if L1 is not None:
        torch.testing.assert_close(L1, L4, rtol=1e-12, atol=1e-14)
