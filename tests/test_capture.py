"""Capture: batch-mean scaling undone, true (Monte Carlo) Fisher for MSE, CE and BCE."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer, inspect_layer


def one_step(model, opt, loss_fn, x, sample: str | None = None, reduction: str = "mean") -> None:
    opt.zero_grad()
    out = model(x)
    if sample is not None:
        opt.sample_fisher(out, sample, torch.Generator().manual_seed(0), reduction)
    loss_fn(out).backward()
    opt.step()


def test_mean_and_sum_losses_give_the_same_factors(registry) -> None:
    x, y = torch.randn(10, 4), torch.randn(10, 3)

    def per_example(o: torch.Tensor) -> torch.Tensor:
        return (o - y).square().mean(1)  # l_i: mean over the 3 outputs

    factors = []
    for averaged, reduce in [(True, torch.mean), (False, torch.sum)]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = KFEOptimizer(model, registry=registry, batch_averaged=averaged, lr=0.0)
        one_step(model, opt, lambda o, reduce=reduce: reduce(per_example(o)), x)
        layer = inspect_layer(opt, model)
        factors.append((layer.A, layer.B))
    torch.testing.assert_close(factors[0][0], factors[1][0])
    torch.testing.assert_close(factors[0][1], factors[1][1])
    with torch.no_grad():  # lr=0: the model is the one the step saw
        g = 2 * (model(x) - y) / 3  # dl_i/dh_i
    torch.testing.assert_close(factors[0][1], g.T @ g / 10, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["batch", "ema"])
def test_lambda_folds_the_per_example_scale_of_each_forward(registry, estimator) -> None:
    """The capture stores the mean loss's ``g`` and the per-example scale ``n_p`` of
    each forward rides on Lambda's matmul: with forwards of 6 and 4 examples and a
    batch-mean, a summed, and a two-forward loss, Lambda equals the explicit
    ``E_i[(U_B^T G_i U_A)^2]`` of the per-example gradients ``G_i = g_i x_i^T``."""
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)

    def l_i(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (o - t).square().sum(1)

    cases = {
        "mean": (True, lambda m: l_i(m(x), y).mean()),
        "sum": (False, lambda m: l_i(m(x), y).sum()),
        # each forward's mean, summed: every forward is rescaled by its own size
        "two forwards": (True, lambda m: l_i(m(x[:6]), y[:6]).mean() + l_i(m(x[6:]), y[6:]).mean()),
    }
    lambdas = {}
    for name, (averaged, loss) in cases.items():
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        opt = KFEOptimizer(
            model,
            registry=registry,
            rule={"name": "ekfac", "estimator": estimator},
            batch_averaged=averaged,
            lr=0.0,
        )
        opt.zero_grad()
        loss(model).backward()
        opt.step()
        layer = inspect_layer(opt, model)
        with torch.no_grad():
            g = 2 * (model(x) - y)  # dl_i/dh_i
        xa = torch.cat([x, torch.ones(10, 1, dtype=x.dtype)], 1)
        per_example = torch.einsum("no,ni->noi", g, xa)  # G_i = g_i x_i^T
        U_B, U_A = layer.basis.U_B, layer.basis.U_A
        expected = (U_B.T @ per_example @ U_A).square().mean(0)
        assert layer.diagonal is not None
        torch.testing.assert_close(layer.diagonal, expected, rtol=1e-10, atol=1e-12)
        lambdas[name] = layer.diagonal
    torch.testing.assert_close(lambdas["mean"], lambdas["sum"], rtol=1e-10, atol=1e-12)


def head_factor(
    registry,
    loss: str,
    out_dim: int,
    n: int = 20000,
    reduction: str = "mean",
    batch_averaged: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B of a linear head under the true Fisher, and the input logits it saw."""
    torch.manual_seed(0)
    model = nn.Linear(3, out_dim)
    opt = KFEOptimizer(
        model, registry=registry, fisher="true", lr=0.0, batch_averaged=batch_averaged
    )
    x = torch.randn(n, 3)
    one_step(model, opt, lambda o: o.sum() * 0, x, sample=loss, reduction=reduction)
    with torch.no_grad():
        logits = model(x)
    return inspect_layer(opt, model).B, logits


def test_true_fisher_mse_matches_gauss_newton(registry) -> None:
    B, _ = head_factor(registry, "mse", 4)
    # y ~ N(f, I/2), l_i = ||f - y||^2 / k with k = 4: E[g g^T] = 4 (1/2) / k^2 I
    torch.testing.assert_close(B, torch.eye(4) * 2 / 16, atol=0.005, rtol=0)


def test_true_fisher_cross_entropy_matches_hessian(registry) -> None:
    B, logits = head_factor(registry, "cross_entropy", 3)
    p = logits.softmax(-1)
    hessian = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(B, hessian, atol=0.01, rtol=0)


def test_true_fisher_bce_matches_hessian(registry) -> None:
    B, logits = head_factor(registry, "bce", 2)
    s = torch.sigmoid(logits)
    fisher = torch.diag((s * (1 - s)).mean(0)) / 2**2  # l_i averages k=2 outputs: 1/k^2
    torch.testing.assert_close(B, fisher, atol=0.005, rtol=0)


@pytest.mark.parametrize("batch_averaged", [True, False])
@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_true_fisher_of_a_loss_summed_over_outputs_is_its_gauss_newton(
    registry, kind, batch_averaged
) -> None:
    """``reduction="sum"``: each example's terms are summed (BCE over pixels), so the
    sampled ``g g^T`` is the Hessian of the example's loss with no ``1/k^2``, for a batch
    mean and a batch sum alike."""
    B, logits = head_factor(registry, kind, 4, reduction="sum", batch_averaged=batch_averaged)
    if kind == "mse":  # terms (f - y)^2, y ~ N(f, I/2): Hessian 2 I
        hessian = 2 * torch.eye(4)
    else:  # Bernoulli: Hessian diag(s (1 - s))
        s = torch.sigmoid(logits)
        hessian = torch.diag((s * (1 - s)).mean(0))
    torch.testing.assert_close(B, hessian, atol=0.04 if kind == "mse" else 0.005, rtol=0)


@pytest.mark.parametrize("kind", ["bce", "cross_entropy", "mse"])
def test_harness_true_fisher_is_on_its_loss_scale(registry, kind) -> None:
    """The experiment harness's losses sum each example's terms; the true Fisher it
    asks for (``LOSS_REDUCTION``) must match the empirical Fisher of those losses on
    labels drawn from the model: the same ``B`` up to Monte Carlo error (a mean
    reduction here would make it ``k^2 = 25`` times smaller)."""
    from kfe.experiment.setup import LOSS_REDUCTION, loss_function

    torch.manual_seed(0)
    n, k = 20000, 5
    model = nn.Linear(3, k)
    x = torch.randn(n, 3)
    with torch.no_grad():
        f = model(x)
    gen = torch.Generator().manual_seed(1)
    if kind == "bce":
        y = torch.bernoulli(torch.sigmoid(f), generator=gen)
    elif kind == "cross_entropy":
        y = torch.multinomial(f.softmax(-1), 1, generator=gen).squeeze(1)
    else:
        y = f + torch.randn(f.shape, generator=gen) * 0.5**0.5
    loss = loss_function(kind)
    factors = {}
    for fisher in ("empirical", "true"):
        opt = KFEOptimizer(model, registry=registry, fisher=fisher, lr=0.0)
        opt.zero_grad()
        out = model(x)
        if fisher == "true":
            opt.sample_fisher(out, kind, torch.Generator().manual_seed(2), LOSS_REDUCTION)
        # the auto-encoder's bce reconstructs its input: the target rides in ``x``
        loss(out, y if kind == "bce" else x, y).backward()
        opt.step()
        factors[fisher] = inspect_layer(opt, model).B
    scale = factors["empirical"].diagonal().mean()
    torch.testing.assert_close(factors["true"], factors["empirical"], atol=0.05 * scale, rtol=0)


def test_sample_fisher_leaves_grads_and_skips_idle_steps(registry) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFEOptimizer(model, registry=registry, fisher="true", factor_every=2, basis_every=2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    out = model(x)
    opt.sample_fisher(out, "cross_entropy")
    assert all(p.grad is None for p in model.parameters())
    assert all(opt.capture.captured[b].grads for b in opt.blocks)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    assert not opt.wants_statistics  # step 1 updates nothing: sample_fisher is a no-op
    opt.zero_grad()
    out = model(x)
    opt.sample_fisher(out, "cross_entropy")
    assert not any(opt.capture.captured[b].grads for b in opt.blocks)


def test_sample_fisher_misuse(registry) -> None:
    model = nn.Linear(3, 2)
    opt = KFEOptimizer(model, registry=registry)
    with pytest.raises(RuntimeError, match="fisher='true'"):
        opt.sample_fisher(model(torch.randn(2, 3)), "mse")
    opt = KFEOptimizer(model, registry=registry, fisher="true")
    with pytest.raises(ValueError, match="kind: must be one of 'cross_entropy', 'mse', 'bce'"):
        opt.sample_fisher(model(torch.randn(2, 3)), "hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction: must be 'mean' or 'sum', not 'max'"):
        opt.sample_fisher(model(torch.randn(2, 3)), "mse", reduction="max")  # type: ignore[arg-type]


def test_empirical_fisher_needs_no_extra_call(registry) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    opt = KFEOptimizer(model, registry=registry)
    nn.functional.cross_entropy(model(torch.randn(6, 3)), torch.randint(0, 2, (6,))).backward()
    opt.step()
    for b in opt.blocks:
        layer = inspect_layer(opt, b.name)
        assert layer.A is not None and layer.B is not None and layer.B.abs().sum() > 0


def test_zero_grad_between_forward_and_backward_drops_that_capture() -> None:
    """A user who zeroes gradients after the forward loses that step's capture, not the run."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = KFEOptimizer(model, rule="ekfac", factor_every=1, basis_every=1, lambda_every=1)
    x = torch.randn(8, 4)
    out = model(x)
    opt.zero_grad()
    out.square().mean().backward()
    with pytest.warns(RuntimeWarning, match="zero_grad between forward and backward"):
        opt.step()  # no capture this step: factors stay unset, parameters still move
    assert "factor_A" not in opt.state[model[0].weight]
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert "factor_A" in opt.state[model[0].weight]


def test_attention_out_proj_is_left_to_the_fallback(registry) -> None:
    """``nn.MultiheadAttention`` never calls ``out_proj``'s forward: the layer is not
    tracked (no silent identity basis), its weight takes the fallback rule like the
    attention's ``in_proj_weight``; the constructor lists it, and no capture warning
    is raised in the steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True),
        nn.Linear(16, 4),
    )
    listed = r"not tracked: '0.self_attn.out_proj' \(nn.MultiheadAttention's out_proj"
    with pytest.warns(RuntimeWarning, match=listed):
        opt = KFEOptimizer(model, registry=registry, lr=1e-2, factor_every=1, basis_every=1)
    names = [b.name for b in opt.blocks]
    assert names == ["0.linear1", "0.linear2", "1"]
    out_proj = model[0].self_attn.out_proj.weight
    before = out_proj.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            one_step(model, opt, lambda o: o.square().mean(), torch.randn(8, 5, 16))
    assert not torch.equal(out_proj, before)
    assert all(opt.state[model[0].get_submodule(n[2:]).weight]["refreshes"] == 2 for n in names[:2])


def test_a_bypassed_forward_warns_naming_the_layer(registry) -> None:
    """A layer whose weight is used without calling its forward gets a gradient but no
    capture: the step says so once, naming the layer."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(nn.functional.linear(x, self.inner.weight)))

    model = Bypass()
    opt = KFEOptimizer(model, registry=registry, lr=1e-2, factor_every=1)
    with pytest.warns(RuntimeWarning, match=r"layer 'inner' .*saw no input") as seen:
        for _ in range(3):
            one_step(model, opt, lambda o: o.square().mean(), torch.randn(8, 4))
    assert sum("captured nothing" in str(w.message) for w in seen) == 1  # once, not per step
    assert inspect_layer(opt, model.head).A is not None


def test_true_fisher_without_sample_fisher_warns_naming_the_call(registry) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = KFEOptimizer(model, registry=registry, fisher="true", lr=1e-2, factor_every=1)
    with pytest.warns(RuntimeWarning, match="sample_fisher"):
        one_step(model, opt, lambda o: o.square().mean(), torch.randn(8, 4))


def test_a_weight_shared_by_two_layers_is_left_to_the_fallback(registry) -> None:
    """Two ``nn.Linear`` holding one weight cannot form one block (two layers' captures,
    two biases): neither is tracked, a warning names both, and the shared weight and both
    biases take the fallback rule (``sgd``: ``p - lr * grad``) instead of one bias never
    moving."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 2))
    with pytest.warns(RuntimeWarning, match=r"not tracked: '0' \(shares its weight with '2'\)"):
        opt = KFEOptimizer(model, registry=registry, lr=0.1, factor_every=1, basis_every=1)
    assert [b.name for b in opt.blocks] == ["4"]
    model(torch.randn(16, 4)).square().mean().backward()
    shared = [first.weight, first.bias, second.bias]
    expected = [(p - 0.1 * p.grad).detach() for p in shared]
    opt.step()
    for p, e in zip(shared, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_parametrized_weight_is_left_to_the_fallback(registry, norm: str) -> None:
    """A layer whose weight is computed by ``torch.nn.utils.parametrize`` has no weight
    parameter to precondition (construction used to fail on an assert): it is not
    tracked, a warning names it, and its parameters take the fallback rule exactly."""
    torch.manual_seed(0)
    wrap = getattr(torch.nn.utils.parametrizations, norm)
    model = nn.Sequential(wrap(nn.Linear(6, 10)), nn.Tanh(), nn.Linear(10, 3))
    listed = r"not tracked: '0' \(weight not a parameter: computed by torch"
    with pytest.warns(RuntimeWarning, match=listed):
        opt = KFEOptimizer(model, registry=registry, lr=0.1, factor_every=1, basis_every=1)
    assert [b.name for b in opt.blocks] == ["2"]
    model(torch.randn(16, 6)).square().mean().backward()
    own = [p for p in model[0].parameters() if p.grad is not None]
    assert len(own) >= 2  # the parametrization's originals and the bias
    expected = [(p - 0.1 * p.grad).detach() for p in own]
    opt.step()
    for p, e in zip(own, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)


def test_refused_layers_are_listed_with_their_reason(registry) -> None:
    """Layers of a known type that the adapter refuses (grouped or reflect-padded
    convolutions) are listed once, with the reason, and take the fallback rule."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    with pytest.warns(RuntimeWarning) as seen:
        opt = KFEOptimizer(model, registry=registry, lr=0.1)
    assert len(seen) == 1
    text = str(seen[0].message)
    assert "'0' (groups != 1)" in text and "'1' (padding_mode='reflect')" in text
    assert [b.name for b in opt.blocks] == ["3"]
    model(torch.randn(2, 4, 6, 6)).square().mean().backward()
    conv = list(model[0].parameters()) + list(model[1].parameters())
    expected = [(p - 0.1 * p.grad).detach() for p in conv]
    opt.step()
    for p, e in zip(conv, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
