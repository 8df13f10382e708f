"""rmsprop, signsgd, adam and the basis sources: limits, policies, SOAP, bad input."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kfe import Eigenbasis, KFEOptimizer, inspect_layer
from kfe import state_keys as K

DT = torch.float64


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)


def backward(model: nn.Module, opt: torch.optim.Optimizer, t: int, loss=None) -> None:
    """Zero the gradients and backpropagate the loss of batch ``t``."""
    x, y = batch(t)
    opt.zero_grad()
    (loss or (lambda m, x, y: nn.functional.mse_loss(m(x), y)))(model, x, y).backward()


def run_pair(reference: torch.optim.Optimizer, ref_model, opt, model, steps: int = 20) -> None:
    for t in range(steps):
        for m, o in ((ref_model, reference), (model, opt)):
            backward(m, o, t)
            o.step()


IDENTITY_LIMITS = [
    (
        "rmsprop",
        lambda p: torch.optim.RMSprop(
            p, lr=1e-2, alpha=0.9, eps=1e-6, momentum=0.5, weight_decay=1e-2
        ),
        dict(
            rule={"name": "rmsprop", "beta2": 0.9, "eps": 1e-6},
            momentum=0.5,
            weight_decay=1e-2,
            weight_decay_style="l2",
        ),
    ),
    (
        "adam",
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=1e-2),
        dict(
            rule={"name": "adam", "beta1": 0.8, "beta2": 0.95, "eps": 1e-7},
            weight_decay=1e-2,
            weight_decay_style="l2",
        ),
    ),
    (
        "adamw",
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        dict(rule="adam", weight_decay=0.1),
    ),
]


@pytest.mark.parametrize(("name", "make_ref", "settings"), IDENTITY_LIMITS, ids=lambda v: v)
def test_identity_basis_reproduces_torch(registry, name, make_ref, settings) -> None:
    ref_model, model = mlp(), mlp()
    reference = make_ref(ref_model.parameters())
    opt = KFEOptimizer(model, basis="identity", lr=1e-2, registry=registry, **settings)
    run_pair(reference, ref_model, opt, model)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_identity_signsgd_is_sign_descent(registry, beta: float) -> None:
    model, ref = mlp(), mlp()
    opt = KFEOptimizer(
        model, rule={"name": "signsgd", "beta": beta}, basis="identity", lr=1e-2, registry=registry
    )
    momenta = [torch.zeros_like(p) for p in ref.parameters()]
    for t in range(20):
        backward(model, opt, t)
        opt.step()
        x, y = batch(t)
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, m in zip(ref.parameters(), momenta, strict=True):
                m.mul_(beta).add_(p.grad, alpha=1 - beta)
                p.sub_(1e-2 * m.sign())
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-14)


def first_layer_state(opt: KFEOptimizer, model: nn.Sequential) -> dict:
    return opt.state[model[0].weight]


def test_rotate_carries_first_moment_exactly(registry) -> None:
    model = mlp()
    beta1 = 0.9
    opt = KFEOptimizer(
        model,
        rule={"name": "adam", "beta1": beta1},
        lr=1e-2,
        registry=registry,
        factor_every=1,
        basis_every=3,
    )
    for t in range(4):  # refreshes at steps 0 and 3
        backward(model, opt, t)
        opt.step()
        if t == 2:
            st = first_layer_state(opt, model)
            old = Eigenbasis(**st[K.BASIS])
            m_param = old.unproject(st[K.RULE]["exp_avg"])
    st = first_layer_state(opt, model)
    new = Eigenbasis(**st[K.BASIS])
    assert not torch.allclose(new.U_A.abs(), old.U_A.abs())  # the basis did change
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    rotated = (st[K.RULE]["exp_avg"] - (1 - beta1) * new.project(grad)) / beta1
    torch.testing.assert_close(new.unproject(rotated), m_param, rtol=1e-10, atol=1e-12)


def test_rotation_is_exact_between_any_bases() -> None:
    def q(n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]

    old = Eigenbasis(q(4, 0), torch.ones(4, dtype=DT), q(3, 1), torch.ones(3, dtype=DT))
    new = Eigenbasis(q(4, 2), torch.ones(4, dtype=DT), q(3, 3), torch.ones(3, dtype=DT))
    m = torch.randn(4, 3, dtype=DT)
    R_B, R_A = old.rotation_to(new)
    torch.testing.assert_close(new.unproject(R_B.mT @ m @ R_A), old.unproject(m))


@pytest.mark.parametrize(
    ("d_out", "d_in", "count", "through_R"),
    [(3, 3, 1, True), (4, 3, 1, False), (4, 3, 2, True), (2, 9, 1, False), (9, 2, 8, True)],
)
def test_rotator_takes_the_cheaper_exact_route(
    monkeypatch, d_out: int, d_in: int, count: int, through_R: bool
) -> None:
    """Both routes map KFE coordinates exactly (the parameter-space matrix is kept), on
    zero-padded bases too; ``R = U^T U'`` is formed only where it costs fewer
    multiply-adds than rotating each tensor through parameter space (counted on the
    sides BLAS sees: the padded ones for padded bases)."""

    def q(n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]

    def basis(seed: int) -> Eigenbasis:
        ones_B, ones_A = torch.ones(d_out, dtype=DT), torch.ones(d_in, dtype=DT)
        return Eigenbasis(q(d_out, seed), ones_B, q(d_in, seed + 1), ones_A)

    formed = []
    rotation_to = Eigenbasis.rotation_to
    monkeypatch.setattr(
        Eigenbasis, "rotation_to", lambda self, new: formed.append(1) or rotation_to(self, new)
    )
    for old, new in ((basis(0), basis(2)), (basis(0).padded(), basis(2).padded())):
        formed.clear()
        rotate = old.rotator_to(new, count)
        if old.U_B.shape == (d_out, d_out):  # unpadded: the route the sizes call for
            assert bool(formed) is through_R
        for k in range(count):
            m = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(k), dtype=DT)
            moved = rotate(m)
            assert moved.shape == m.shape
            torch.testing.assert_close(new.unproject(moved), old.unproject(m))


def test_reset_restarts_adam(registry) -> None:
    model = mlp()
    opt = KFEOptimizer(
        model,
        rule={"name": "adam", "basis_policy": "reset", "beta1": 0.9, "beta2": 0.99},
        lr=1e-2,
        registry=registry,
        factor_every=1,
        basis_every=3,
    )
    for t in range(4):
        backward(model, opt, t)
        opt.step()
        rule = first_layer_state(opt, model)[K.RULE]
        assert rule["step"] == (t + 1 if t < 3 else 1)
    st = first_layer_state(opt, model)
    g = Eigenbasis(**st[K.BASIS]).project(
        torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    )
    torch.testing.assert_close(st[K.RULE]["exp_avg"], 0.1 * g)
    torch.testing.assert_close(st[K.RULE]["exp_avg_sq"], 0.01 * g.square())


def test_permuting_refresh_keeps_state_with_its_eigenvector(registry) -> None:
    model = mlp()
    beta2 = 0.9
    opt = KFEOptimizer(
        model,
        rule={"name": "rmsprop", "beta2": beta2},
        lr=1e-2,
        registry=registry,
        factor_every=100,
        basis_every=3,
    )
    for t in range(4):  # refreshes at steps 0 and 3
        backward(model, opt, t)
        if t == 3:
            # same eigenvectors, eigenvalues in the reverse order: eigh re-sorts the columns
            st = first_layer_state(opt, model)
            old = Eigenbasis(**st[K.BASIS])
            v_old = st[K.RULE]["square_avg"].clone()
            st[K.FACTOR_A] = (old.U_A * (old.a.flip(0) + 1)) @ old.U_A.mT
            st[K.FACTOR_B] = (old.U_B * (old.b.flip(0) + 1)) @ old.U_B.mT
        opt.step()
    st = first_layer_state(opt, model)
    new = Eigenbasis(**st[K.BASIS])
    eye_a, eye_b = torch.eye(6, dtype=DT), torch.eye(7, dtype=DT)
    torch.testing.assert_close((old.U_A.mT @ new.U_A).abs(), eye_a, atol=1e-8, rtol=0)
    torch.testing.assert_close((old.U_B.mT @ new.U_B).abs(), eye_b, atol=1e-8, rtol=0)
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    expected = beta2 * v_old + (1 - beta2) * new.project(grad).square()
    torch.testing.assert_close(st[K.RULE]["square_avg"], expected)


def greedy_match(old: Tensor, new: Tensor) -> list[int]:
    """Repeatedly pair the unmatched old and new eigenvectors with the largest overlap."""
    overlap = (old.T @ new).abs()
    pairs = sorted(
        ((overlap[i, j].item(), i, j) for i in range(len(old)) for j in range(len(old))),
        reverse=True,
    )
    perm, used = {}, set()
    for _, i, j in pairs:
        if i not in perm and j not in used:
            perm[i] = j
            used.add(j)
    return [perm[i] for i in range(len(old))]


def soap_reference(
    model: nn.Sequential,
    steps: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    every: int,
) -> None:
    """SOAP (Vyas et al., 2024, Algorithm 1), written out densely per layer.

    Reference for the details: the authors' implementation (github nikhilvyas/SOAP,
    soap.py): Adam on the gradient projected onto the eigenvectors of the EMA Shampoo
    factors L = EMA(G G^T), R = EMA(G^T G) (EMA decay `shampoo_beta`), bias-corrected
    moments, the first moment projected back to parameter space and into the new
    eigenbasis at each basis update, the second moment re-indexed to follow its
    eigenvector (they re-sort by eigenvalue estimates; kfe and this reference match each
    new eigenvector to the old one it overlaps most, greedily). Deliberate differences,
    as documented in docs/rules.md: the basis is an exact `eigh` at every refresh
    (their first computation; they then use one QR power-iteration step), factors are
    updated before the step that uses them, and the first step updates the parameters
    (theirs only initialises); the bias is a column of the layer's matrix (their code
    treats it as a separate 1-D parameter).
    """
    layers = [m for m in model if isinstance(m, nn.Linear)]
    state = {id(m): {} for m in layers}
    for t in range(steps):
        x, y = batch(t)
        model.zero_grad()
        square_loss(model, x, y).backward()
        with torch.no_grad():
            for m in layers:
                s = state[id(m)]
                G = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
                if t == 0:
                    s["L"], s["R"] = G @ G.T, G.T @ G
                    s["m"] = torch.zeros_like(G)
                    s["v"] = torch.zeros_like(G)
                else:
                    # the same rounding as kfe's EMA: eigh of a rank-deficient factor
                    # is sensitive to the last bit in its null space
                    s["L"] = torch.lerp(s["L"], G @ G.T, 1 - decay)
                    s["R"] = torch.lerp(s["R"], G.T @ G, 1 - decay)
                if t % every == 0:
                    QL = torch.linalg.eigh(s["L"]).eigenvectors
                    QR = torch.linalg.eigh(s["R"]).eigenvectors
                    if t > 0:
                        # match new eigenvectors to old ones, then rotate m exactly
                        QL = QL[:, greedy_match(s["QL"], QL)]
                        QR = QR[:, greedy_match(s["QR"], QR)]
                        m_param = s["QL"] @ s["m"] @ s["QR"].T
                        s["m"] = QL.T @ m_param @ QR
                    s["QL"], s["QR"] = QL, QR
                QL, QR = s["QL"], s["QR"]
                g = QL.T @ G @ QR
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                m_hat = s["m"] / (1 - beta1 ** (t + 1))
                v_hat = s["v"] / (1 - beta2 ** (t + 1))
                D = QL @ (m_hat / (v_hat.sqrt() + eps)) @ QR.T
                m.weight -= lr * D[:, :-1]
                m.bias -= lr * D[:, -1]


def square_mlp(seed: int = 0) -> nn.Sequential:
    """Square blocks (d_out = d_in + 1): both Shampoo factors of one gradient are full rank,
    so the eigenvectors of the first refresh are unique (no arbitrary null space)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7)).to(DT)


def square_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """All 7 outputs get a target, so no gradient row is identically zero."""
    return nn.functional.mse_loss(model(x), torch.cat([y, x[:, :4].tanh()], 1))


def test_adam_on_shampoo_is_soap(registry) -> None:
    ref, model = square_mlp(), square_mlp()
    soap_reference(ref, 25, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, decay=0.9, every=10)
    opt = KFEOptimizer(
        model,
        rule={"name": "adam", "beta1": 0.9, "beta2": 0.95},
        basis="shampoo",
        lr=1e-2,
        factor_decay=0.9,
        factor_every=1,
        basis_every=10,
        registry=registry,
    )
    for t in range(25):
        backward(model, opt, t, square_loss)
        opt.step()
    # Both agree to ~5e-10 from the first step on: kfe orders eigenvectors differently (it
    # matches the first basis to the identity), so sums round differently, and Adam's
    # first steps divide tiny projected gradients by their own size. A wrong rotation,
    # matching or bias correction shows up at 1e-3 or more.
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)


def test_shampoo_factors_are_gradient_outer_products(registry) -> None:
    model = mlp()
    opt = KFEOptimizer(model, rule="adam", basis="shampoo", registry=registry, lr=0.0)
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    G = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)
    layer = inspect_layer(opt, "2")
    torch.testing.assert_close(layer.A, G.T @ G)
    torch.testing.assert_close(layer.B, G @ G.T)
    assert not opt.capture.active  # no hooks needed for adam on shampoo


def test_shampoo_covers_untracked_matrices(registry) -> None:
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 2))
    opt = KFEOptimizer(model, rule="adam", basis="shampoo", registry=registry)
    assert [b.name for b in opt.blocks] == ["1", "0.weight"]
    opt = KFEOptimizer(
        model, rule="adam", basis={"name": "shampoo", "cover_untracked": False}, registry=registry
    )
    assert [b.name for b in opt.blocks] == ["1"]
    with pytest.raises(ValueError, match=r"rule 'ekfac' needs per-example.*\['0.weight'\]"):
        KFEOptimizer(
            model, rule={"name": "ekfac", "estimator": "batch"}, basis="shampoo", registry=registry
        )
    KFEOptimizer(
        model, rule="ekfac", basis={"name": "shampoo", "cover_untracked": False}, registry=registry
    )


@pytest.mark.parametrize(
    ("settings", "loc", "message"),
    [
        (dict(rule="kfac", basis="shampoo"), (), "basis: rule 'kfac' needs Fisher factor"),
        (dict(rule="kfac", basis="identity"), (), "basis: rule 'kfac' needs Fisher factor"),
        (
            dict(rule={"name": "rmsprop", "exponent": 1.5}),
            ("rule", "rmsprop", "exponent"),
            "less than or equal to 1",
        ),
        (dict(rule={"name": "adam", "beta1": 1.0}), ("rule", "adam", "beta1"), "less than 1"),
        (
            dict(rule={"name": "signsgd", "beta": -0.1}),
            ("rule", "signsgd", "beta"),
            "greater than or equal to 0",
        ),
        (
            dict(rule={"name": "rmsprop", "basis_policy": "rotate"}),
            ("rule", "rmsprop", "basis_policy"),
            "'keep' or 'reset'",
        ),
        (dict(basis="qr"), (), "basis: unknown basis 'qr'; registered bases: identity, kfac"),
    ],
)
def test_bad_rule_and_basis_settings_fail_naming_the_field(registry, settings, loc, message):
    with pytest.raises(ValidationError) as err:
        KFEOptimizer(mlp(), registry=registry, **settings)
    assert message in str(err.value)
    if loc:
        assert err.value.errors()[0]["loc"] == loc


class HalfDead(nn.Module):
    """Two layers; the output of ``dead`` is multiplied by zero, so its captured
    gradients, its Lambda, its factor ``B`` and its gradient are all exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.live = nn.Linear(6, 3)
        self.dead = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.live(x) + 0 * self.dead(x)


@pytest.mark.parametrize(
    "rule",
    [
        {"name": "ekfac", "estimator": "ema", "damping_scale": "mean"},
        {"name": "ekfac", "estimator": "batch", "damping_scale": "mean"},
        {"name": "kfac", "damping_mode": "product", "damping_scale": "mean"},
        {"name": "kfac", "damping_mode": "split", "damping_scale": "mean"},
    ],
    ids=lambda r: f"{r['name']}-{r.get('estimator', r.get('damping_mode'))}",
)
@pytest.mark.parametrize("kl_clip", [None, 1e-2])
def test_relative_damping_of_a_dead_block_is_finite(registry, rule, kl_clip) -> None:
    """A block with all-zero curvature has no scale to be relative to: ``0 / 0`` must not
    reach the parameters (nor, through KL clipping's common factor, the other blocks)."""
    model = HalfDead()
    dead_before = [p.detach().clone() for p in model.dead.parameters()]
    live_before = [p.detach().clone() for p in model.live.parameters()]
    opt = KFEOptimizer(
        model,
        registry=registry,
        rule=rule,
        lr=0.1,
        damping=1e-2,
        kl_clip=kl_clip,
        factor_every=1,
        basis_every=2,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for p, before in zip(model.dead.parameters(), dead_before, strict=True):
        assert torch.equal(p, before)
    for p, before in zip(model.live.parameters(), live_before, strict=True):
        assert p.isfinite().all() and not torch.equal(p, before)
