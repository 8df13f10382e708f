"""Brute-force twins: every curvature number ``kfe`` computes, against a dense computation.

The reference side never touches ``kfe``'s code path: per-example gradients come from
``torch.func`` (``vmap(grad(...))``), layer inputs from the Jacobian of the layer output
with respect to its weight (no ``F.unfold``), output gradients from ``grad`` of each
example's own loss, and preconditioned updates from ``torch.linalg.solve`` on dense
``kron`` matrices (see ``tests/brute.py``). Everything runs in float64 so tolerances are
tight; the default dtype is never changed.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import kfe
from kfe.statistics import GRAM_BLOCK, gram
from tests.conftest import BUILTIN_PLUGINS

try:
    from tests import brute
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import brute

DT = torch.float64
# the built-in plugins, listed explicitly: the tests do not depend on what is installed
REGISTRY = kfe.load_registry(BUILTIN_PLUGINS)

# torch's own notice for padding="same" with an even kernel; irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out only costs time (much of it on a busy 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- cases -------------------------------------------------------------------------


@dataclass
class Case:
    """A small float64 model, a batch, a mean loss and the tracked layer under test."""

    model: nn.Sequential
    X: Tensor
    Y: Tensor
    loss_fn: brute.LossFn
    index: int  # the layer under test, ``model[index]``
    channel_dim: int  # output-feature dim of that layer's output

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def layer(self) -> nn.Module:
        return self.model[self.index]

    def loss(self) -> Tensor:
        return self.loss_fn(self.model(self.X), self.Y)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DT)


def linear_bias() -> Case:
    torch.manual_seed(0)
    g = _gen(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    return Case(model, _randn(g, 8, 4), _randn(g, 8, 2), brute.mse, 0, -1)


def linear_nobias() -> Case:
    torch.manual_seed(2)
    g = _gen(3)
    model = nn.Sequential(nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, 4)).double()
    Y = torch.randint(0, 4, (7,), generator=g)
    return Case(model, _randn(g, 7, 5), Y, brute.cross_entropy, 0, -1)


def linear_last_ce() -> Case:
    """The output layer under cross-entropy: ``B`` is singular (rows of g sum to 0)."""
    torch.manual_seed(4)
    g = _gen(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    Y = torch.randint(0, 3, (9,), generator=g)
    return Case(model, _randn(g, 9, 3), Y, brute.cross_entropy, 2, -1)


def linear_sequence() -> Case:
    """``(n, T, d)`` input: T = 5 positions share the weight; token-level cross-entropy."""
    torch.manual_seed(6)
    g = _gen(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    Y = torch.randint(0, 3, (6, 5), generator=g)
    return Case(model, _randn(g, 6, 5, 3), Y, brute.cross_entropy, 0, -1)


def linear_sequence_mse() -> Case:
    """``(n, T, d)`` input, the output layer under test, MSE on every token."""
    torch.manual_seed(8)
    g = _gen(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return Case(model, _randn(g, 7, 4, 3), _randn(g, 7, 4, 2), brute.mse, 2, -1)


def conv_stride2() -> Case:
    """Conv2d, stride 2, padding 1: 5x5 -> 3x3, T = 9 patches of 2*3*3 + 1."""
    torch.manual_seed(10)
    g = _gen(11)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).double()
    Y = torch.randint(0, 3, (8,), generator=g)
    return Case(model, _randn(g, 8, 2, 5, 5), Y, brute.cross_entropy, 0, 1)


def conv_same_dilated() -> Case:
    """Conv2d, ``padding="same"`` with an asymmetric (odd total) pad and dilation."""
    torch.manual_seed(12)
    g = _gen(13)
    conv = nn.Conv2d(2, 3, kernel_size=(2, 3), padding="same", dilation=(1, 2))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 5, 2)).double()
    return Case(model, _randn(g, 6, 2, 4, 5), _randn(g, 6, 2), brute.mse, 0, 1)


def conv_dilated_nobias() -> Case:
    """Conv2d without bias, dilation 2, stride (1, 2), padding 2."""
    torch.manual_seed(14)
    g = _gen(15)
    conv = nn.Conv2d(2, 2, kernel_size=3, dilation=2, stride=(1, 2), padding=2, bias=False)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 3, 2)).double()
    return Case(model, _randn(g, 7, 2, 5, 5), _randn(g, 7, 2), brute.mse, 0, 1)


CASES: dict[str, Callable[[], Case]] = {
    f.__name__: f
    for f in (
        linear_bias,
        linear_nobias,
        linear_last_ce,
        linear_sequence,
        linear_sequence_mse,
        conv_stride2,
        conv_same_dilated,
        conv_dilated_nobias,
    )
}

ONE_STEP = {"factor_every": 1, "basis_every": 1, "lambda_every": 1}


def one_step(
    case: Case, rule: str | dict, damping: float, **settings: Any
) -> tuple[kfe.KFEOptimizer, Tensor]:
    """One step with ``lr=1``: the optimizer and ``D = W_aug(before) - W_aug(after)``."""
    opt = kfe.KFEOptimizer(
        case.model,
        registry=REGISTRY,
        rule=rule,
        lr=1.0,
        damping=damping,
        **ONE_STEP,
        **settings,
    )
    before = brute.layer_matrix(case.layer)
    case.loss().backward()
    opt.step()
    return opt, before - brute.layer_matrix(case.layer)


@dataclass
class Dense:
    """The brute-force side of one case, computed before any step."""

    x: Tensor  # (n, T, d_in[+1])
    g: Tensor  # (n, T, d_out)
    G: Tensor  # per-example gradients (n, d_out, d_in[+1])
    F: Tensor  # dense empirical Fisher
    grad: Tensor  # vec of the mean-loss gradient
    A: Tensor
    B: Tensor


@functools.cache
def dense_of(case_name: str) -> Dense:
    """The brute-force side of a case, on a fresh (unstepped) copy; cached per case."""
    return dense(CASES[case_name]())


def dense(case: Case) -> Dense:
    x, g = brute.layer_io(case.model, case.index, case.loss_fn, case.X, case.Y, case.channel_dim)
    G = brute.per_example_layer_grads(case.model, case.name, case.loss_fn, case.X, case.Y)
    A, B = brute.factors(x, g)
    return Dense(x, g, G, brute.dense_fisher(G), G.mean(0).reshape(-1), A, B)


def assert_close(actual: Tensor, expected: Tensor, rel: float = 1e-10) -> None:
    """``|actual - expected| <= rel * max|expected|`` elementwise (plus float64 round-off)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale + 1e-300)


def assert_eigenbasis(U: Tensor, values: Tensor, M: Tensor) -> None:
    """``U`` is orthonormal and ``M U = U diag(values)`` with ``values`` M's spectrum."""
    eye = torch.eye(U.shape[0], dtype=U.dtype)
    assert_close(U.mT @ U, eye)
    assert_close(M @ U, U * values, rel=1e-9)
    assert_close(values.sort().values, torch.linalg.eigvalsh(M).clamp_min(0), rel=1e-9)


case_names = pytest.mark.parametrize("case_name", list(CASES))


# -- 1. Kronecker factors --------------------------------------------------------


@case_names
def test_factors_match_explicit_sums(case_name: str) -> None:
    case = CASES[case_name]()
    ref = dense_of(case_name)
    # the two brute-force routes agree: sum_t g_t x_t^T is the torch.func gradient
    assert_close(torch.einsum("ntj,ntk->njk", ref.g, ref.x), ref.G)
    # g is d l_i / d h (the per-example loss), not the mean-loss gradient g / n
    mean_grad = torch.autograd.grad(case.loss(), case.layer.weight)[0]
    assert_close(ref.G[..., : mean_grad[0].numel()].mean(0), mean_grad.reshape(ref.G.shape[1], -1))

    opt, _ = one_step(case, {"name": "ekfac", "estimator": "batch"}, 1e-2)
    cur = kfe.inspect_layer(opt, case.name)
    assert cur.A is not None and cur.B is not None
    assert cur.A.shape == ref.A.shape and cur.B.shape == ref.B.shape
    assert_close(cur.A, ref.A)
    assert_close(cur.B, ref.B)
    assert_close(cur.kronecker(), torch.kron(ref.B, ref.A))
    # the basis of step 0 is the eigenbasis of these factors
    assert_eigenbasis(cur.basis.U_A, cur.basis.a, ref.A)
    assert_eigenbasis(cur.basis.U_B, cur.basis.b, ref.B)


def test_identity_factor_start_folds_every_batch_into_it() -> None:
    """``factor_init=(s_A, s_B)``: ``A_1 = lerp(s_A I, A_b1, w)``, ``A_2 = lerp(A_1, A_b2, w)``;
    the batch factors read from a twin whose EMA keeps only the latest batch."""
    factors = {}
    for name, extra in (
        ("start", {"factor_init": (2.0, 5.0), "factor_decay": 0.8}),
        ("batch", {"factor_decay": 0.0}),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        opt = kfe.KFEOptimizer(
            model, rule="ekfac", lr=0.0, factor_every=1, basis_every=100, **extra
        )
        g = torch.Generator().manual_seed(1)
        factors[name] = []
        for _ in range(2):
            x = torch.randn(8, 3, generator=g, dtype=DT)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            layer = kfe.inspect_layer(opt, "2")
            assert layer.A is not None and layer.B is not None
            factors[name].append((layer.A.clone(), layer.B.clone()))
    (A1, B1), (A2, B2) = factors["start"]
    (a1, b1), (a2, b2) = factors["batch"]
    assert_close(A1, torch.lerp(2.0 * torch.eye(5, dtype=DT), a1, 0.2))
    assert_close(B1, torch.lerp(5.0 * torch.eye(2, dtype=DT), b1, 0.2))
    assert_close(A2, torch.lerp(A1, a2, 0.2))
    assert_close(B2, torch.lerp(B1, b2, 0.2))
    with pytest.raises(ValueError, match="factor_init"):
        kfe.KFEOptimizer(model, factor_init=(0.0, 1.0))


@settings(deadline=None, max_examples=20)
@given(rows=st.integers(1, 40), cols=st.integers(1, 3 * GRAM_BLOCK + 20))
def test_blocked_gram_is_the_sum_of_outer_products(rows: int, cols: int) -> None:
    """The factors' ``m^T m`` computed block-triangle-wise (wide layers split their
    columns) equals ``sum_k m_k m_k^T`` written out, on either side of each split."""
    g = torch.Generator().manual_seed(rows * cols)
    m = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    explicit = sum(torch.outer(r, r) for r in m)
    assert_close(gram(m), explicit)


# -- 2. EKFAC's Lambda ----------------------------------------------------------------


@case_names
def test_ekfac_lambda_is_fisher_diagonal_in_kfe(case_name: str) -> None:
    case = CASES[case_name]()
    ref = dense_of(case_name)
    opt, _ = one_step(case, {"name": "ekfac", "estimator": "batch"}, 1e-2)
    cur = kfe.inspect_layer(opt, case.name)
    # Lambda is only meaningful in the true eigenbasis of the factors (an identity basis
    # would make diag(U^T F U) the plain diagonal of F and pass the comparison below)
    assert_eigenbasis(cur.basis.U_A, cur.basis.a, ref.A)
    assert_eigenbasis(cur.basis.U_B, cur.basis.b, ref.B)
    U = torch.kron(cur.basis.U_B, cur.basis.U_A)
    expected = torch.diagonal(U.mT @ ref.F @ U).reshape(ref.G.shape[1:])
    assert cur.diagonal is not None
    assert_close(cur.diagonal, expected)
    # and the dense EKFAC block has exactly F's diagonal in that basis
    assert_close(torch.diagonal(U.mT @ cur.dense() @ U), expected.reshape(-1))


def test_ekfac_lambda_two_forwards_one_backward() -> None:
    """``kfe/statistics.py``: several forwards in one step count as one larger batch."""
    case = linear_bias()
    X1, X2, Y1, Y2 = case.X[:4], 3 * case.X[4:], case.Y[:4], case.Y[4:]
    X, Y = torch.cat([X1, X2]), torch.cat([Y1, Y2])
    F = brute.dense_fisher(brute.per_example_layer_grads(case.model, "0", brute.mse, X, Y))
    opt = kfe.KFEOptimizer(
        case.model,
        registry=REGISTRY,
        rule={"name": "ekfac", "estimator": "batch"},
        lr=1.0,
        **ONE_STEP,
    )
    # a sum of per-chunk means: each chunk's rescaled g is exactly d l_i / d h
    (brute.mse(case.model(X1), Y1) + brute.mse(case.model(X2), Y2)).backward()
    opt.step()
    cur = kfe.inspect_layer(opt, "0")
    U = torch.kron(cur.basis.U_B, cur.basis.U_A)
    assert cur.diagonal is not None
    assert_close(cur.diagonal.reshape(-1), torch.diagonal(U.mT @ F @ U))


@pytest.mark.parametrize("positions", [1, 2, 3, 5, 8, 9, 13])
@pytest.mark.parametrize("route", ["pairs", "examples"])
@pytest.mark.parametrize("chunk_bytes", [1, 2**20])
def test_lambda_routes_equal_explicit_per_example_gradients(
    monkeypatch: pytest.MonkeyPatch, positions: int, route: str, chunk_bytes: int
) -> None:
    """Both ways ``kfe_moments`` sums over positions (a matmul over position pairs, or
    per-example projected gradients) give ``(1/n) sum_i (U_B^T G_i U_A)^2`` with
    ``G_i = sum_t c_p g_it x_it^T`` written out, for two forwards with their own example
    scales, in chunks of one example and of the whole batch; the projected gradient is
    ``sum_p U_B^T g_p^T x_p U_A``."""
    import kfe.statistics as stats

    limit = 10**6 if route == "pairs" else 0
    monkeypatch.setattr(stats, "PAIRS_MAX_POSITIONS", limit)
    monkeypatch.setattr(stats, "PAIRS_SMALL_BLOCK", 0)
    assert stats.pairs_route(positions, 4, 6) == (route == "pairs")
    g = torch.Generator().manual_seed(positions)
    U_A = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))[0]
    U_B = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))[0]
    pairs = [
        (torch.randn(n, positions, 6, generator=g, dtype=DT),
         torch.randn(n, positions, 4, generator=g, dtype=DT))
        for n in (3, 5)
    ]  # fmt: skip
    scales = [3.0, 0.5]
    moments = stats.kfe_moments(
        [(x.clone(), g_.clone()) for x, g_ in pairs],
        U_B,
        U_A,
        chunk_bytes=chunk_bytes,
        gradient=True,
        example_scales=scales,
    )
    per_example = torch.cat(
        [c * torch.einsum("ntj,ntk->njk", g_, x) for (x, g_), c in zip(pairs, scales, strict=True)]
    )
    expected = (U_B.mT @ per_example @ U_A).square().mean(0)
    assert_close(moments.squares, expected)
    gradient = sum(torch.einsum("ntj,ntk->jk", g_, x) for x, g_ in pairs)
    assert moments.gradient is not None
    assert_close(moments.gradient, U_B.mT @ gradient @ U_A)


# -- 3. K-FAC update -------------------------------------------------------------------


@case_names
@pytest.mark.parametrize("scale", ["absolute", "mean"])
def test_kfac_product_update_is_dense_solve(case_name: str, scale: str) -> None:
    """``mean``: the damping is relative to the block's mean eigenvalue product,
    ``tr(A (x) B) / dim = (tr A / d_A)(tr B / d_B)``."""
    case = CASES[case_name]()
    ref = dense_of(case_name)
    damping = 3e-2
    rule = {"name": "kfac", "damping_mode": "product", "damping_scale": scale}
    _, D = one_step(case, rule, damping)
    K = torch.kron(ref.B, ref.A)
    if scale == "mean":
        damping *= torch.trace(K).item() / K.shape[0]
    expected = torch.linalg.solve(K + damping * torch.eye(K.shape[0], dtype=DT), ref.grad)
    assert_close(D.reshape(-1), expected, rel=1e-9)


@case_names
def test_kfac_split_mean_damping_is_dense_solve(case_name: str) -> None:
    """Split and relative: each factor damped by ``sqrt(damping)`` times its mean eigenvalue."""
    case = CASES[case_name]()
    ref = dense_of(case_name)
    damping = 3e-2
    rule = {"name": "kfac", "damping_mode": "split", "damping_scale": "mean"}
    _, D = one_step(case, rule, damping)
    root = math.sqrt(damping)
    A_d = ref.A + root * torch.trace(ref.A) / ref.A.shape[0] * torch.eye(ref.A.shape[0], dtype=DT)
    B_d = ref.B + root * torch.trace(ref.B) / ref.B.shape[0] * torch.eye(ref.B.shape[0], dtype=DT)
    expected = torch.linalg.solve(torch.kron(B_d, A_d), ref.grad)
    assert_close(D.reshape(-1), expected, rel=1e-9)


@case_names
@pytest.mark.parametrize("pi_correction", [True, False])
def test_kfac_split_update_is_dense_solve(case_name: str, pi_correction: bool) -> None:
    case = CASES[case_name]()
    ref = dense_of(case_name)
    damping = 3e-2
    rule = {"name": "kfac", "damping_mode": "split", "pi_correction": pi_correction}
    _, D = one_step(case, rule, damping)
    pi = 1.0
    if pi_correction:
        mean_a = torch.trace(ref.A).item() / ref.A.shape[0]
        mean_b = torch.trace(ref.B).item() / ref.B.shape[0]
        pi = math.sqrt(mean_a / mean_b)
    d_A, d_B = pi * math.sqrt(damping), math.sqrt(damping) / pi
    A_d = ref.A + d_A * torch.eye(ref.A.shape[0], dtype=DT)
    B_d = ref.B + d_B * torch.eye(ref.B.shape[0], dtype=DT)
    expected = torch.linalg.solve(torch.kron(B_d, A_d), ref.grad)
    assert_close(D.reshape(-1), expected, rel=1e-9)


# -- 4. EKFAC update -------------------------------------------------------------------


@case_names
@pytest.mark.parametrize("scale", ["absolute", "mean"])
def test_ekfac_update_is_dense(case_name: str, scale: str) -> None:
    """``mean``: damping relative to the block's mean Lambda, ``tr(U^T F U) / dim``."""
    case = CASES[case_name]()
    ref = dense_of(case_name)
    damping = 2e-2
    rule = {"name": "ekfac", "estimator": "batch", "damping_scale": scale}
    opt, D = one_step(case, rule, damping)
    basis = kfe.inspect_layer(opt, case.name).basis
    assert_eigenbasis(basis.U_A, basis.a, ref.A)
    assert_eigenbasis(basis.U_B, basis.b, ref.B)
    U = torch.kron(basis.U_B, basis.U_A)
    lam = torch.diagonal(U.mT @ ref.F @ U)
    if scale == "mean":
        damping *= torch.trace(ref.F).item() / ref.F.shape[0]
    expected = U @ ((U.mT @ ref.grad) / (lam + damping))
    assert_close(D.reshape(-1), expected, rel=1e-9)


@case_names
def test_ekfac_with_factor_init_keeps_the_prior(case_name: str) -> None:
    """With ``factor_init=(s_A, s_B)`` the factors are ``A = A_d + c_A I``, ``B = B_d +
    c_B I`` (``c = s * decay`` after one fold, ``A_d = (1 - decay) A_batch``), and the
    update divides by ``Lambda`` plus the diagonal in the KFE of the prior's part of
    K-FAC's model, ``B (x) A - B_d (x) A_d``, formed densely here."""
    case = CASES[case_name]()
    ref = dense_of(case_name)
    s_A, s_B, decay, damping = 0.3, 2.0, 0.75, 2e-2
    opt = kfe.KFEOptimizer(
        case.model,
        registry=REGISTRY,
        rule={"name": "ekfac", "estimator": "batch"},
        lr=1.0,
        damping=damping,
        factor_init=(s_A, s_B),
        factor_decay=decay,
        **ONE_STEP,
    )
    before = brute.layer_matrix(case.layer)
    case.loss().backward()
    opt.step()
    D = before - brute.layer_matrix(case.layer)
    c_A, c_B = s_A * decay, s_B * decay
    A_d, B_d = (1 - decay) * ref.A, (1 - decay) * ref.B
    A = A_d + c_A * torch.eye(A_d.shape[0], dtype=DT)
    B = B_d + c_B * torch.eye(B_d.shape[0], dtype=DT)
    layer = kfe.inspect_layer(opt, case.name)
    assert layer.A is not None and layer.B is not None
    assert_close(layer.A, A)
    assert_close(layer.B, B)
    basis = layer.basis
    U = torch.kron(basis.U_B, basis.U_A)
    assert opt.rule_context(opt.block(case.name)).prior == (c_B, c_A)
    lam = torch.diagonal(U.mT @ ref.F @ U)
    prior = torch.diagonal(U.mT @ (torch.kron(B, A) - torch.kron(B_d, A_d)) @ U)
    expected = U @ ((U.mT @ ref.grad) / (lam + prior + damping))
    assert_close(D.reshape(-1), expected, rel=1e-9)
    assert layer.diagonal is not None  # the inspected diagonal is the one divided by
    assert_close(layer.diagonal.reshape(-1), lam + prior, rel=1e-9)


def test_factor_prior_decays_per_fold_and_is_read_at_the_refresh() -> None:
    """The prior's weight is ``s * decay^k`` after ``k`` folds; the rule sees the
    weight of its basis's refresh, not today's; without ``factor_init`` there is none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    opt = kfe.KFEOptimizer(
        model,
        rule="ekfac",
        lr=0.0,
        factor_init=(2.0, 5.0),
        factor_decay=0.5,
        factor_every=1,
        basis_every=2,
    )
    block = opt.block("2")
    seen = []
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3, generator=g, dtype=DT)).square().mean().backward()
        opt.step()
        seen.append((opt.state[block.weight]["factor_prior"], opt.rule_context(block).prior))
    assert seen == [
        ((1.0, 2.5), (2.5, 1.0)),  # fold 1, refresh at step 0
        ((0.5, 1.25), (2.5, 1.0)),  # fold 2, the basis of step 0
        ((0.25, 0.625), (0.625, 0.25)),  # fold 3, refresh at step 2
        ((0.125, 0.3125), (0.625, 0.25)),
    ]
    plain = kfe.KFEOptimizer(nn.Linear(3, 2).to(DT), rule="ekfac", factor_every=1, basis_every=1)
    plain.zero_grad()
    plain.blocks[0].module(torch.randn(4, 3, dtype=DT)).sum().backward()
    plain.step()
    assert plain.rule_context(plain.blocks[0]).prior is None


# -- 5. EKFAC is the best diagonal in the KFE ------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 3),
    n=st.integers(1, 6),
    T=st.integers(1, 3),
    bias=st.booleans(),
    hidden=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ekfac_no_worse_than_kfac_in_frobenius(
    d_in: int, d_out: int, n: int, T: int, bias: bool, hidden: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = _gen(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=bias)]
    if hidden:
        layers += [nn.Tanh(), nn.Linear(d_out, 2)]
    model = nn.Sequential(*layers).double()
    shape = (n, d_in) if T == 1 else (n, T, d_in)
    X = _randn(gen, *shape) * (1 + 2 * torch.rand((), generator=gen, dtype=DT))
    Y = torch.randn(model(X).shape, generator=gen, dtype=DT)
    case = Case(model, X, Y, brute.mse, 0, -1)

    F = brute.dense_fisher(
        brute.per_example_layer_grads(model, "0", brute.mse, X, Y)  # before the step
    )
    opt, _ = one_step(case, {"name": "ekfac", "estimator": "batch"}, 1e-3)
    cur = kfe.inspect_layer(opt, "0")
    err_ekfac = torch.linalg.matrix_norm(F - cur.dense()).item()
    err_kfac = torch.linalg.matrix_norm(F - cur.kronecker()).item()
    assert err_ekfac <= err_kfac + 1e-12 * max(1.0, torch.linalg.matrix_norm(F).item())


# -- 6. SGD in the KFE is torch.optim.SGD ----------------------------------------------


@pytest.mark.parametrize(
    ("nesterov", "dampening"), [(False, 0.0), (True, 0.0), (False, 0.3)], ids=str
)
def test_sgd_rule_in_kfe_matches_torch_sgd(nesterov: bool, dampening: float) -> None:
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    twin = copy.deepcopy(model)
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": nesterov}
    hyper["dampening"] = dampening
    opt = kfe.KFEOptimizer(
        model,
        registry=REGISTRY,
        rule="sgd",
        weight_decay_style="l2",
        factor_every=1,
        basis_every=5,
        **hyper,
    )
    ref = torch.optim.SGD(twin.parameters(), **hyper)
    gen = _gen(21)
    for step in range(20):
        X, Y = _randn(gen, 10, 4), _randn(gen, 10, 3)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            brute.mse(m(X), Y).backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    # the KFE was a genuine rotation, not the identity, when SGD was reproduced
    U_A = kfe.inspect_layer(opt, "0").basis.U_A
    assert (U_A - torch.eye(5, dtype=DT)).abs().max() > 0.1


# -- 7. parameter-space fallback is torch.optim.SGD, bit for bit -------------------------


class WithUntracked(nn.Module):
    """Embedding and LayerNorm (fallback) around tracked Linear layers, float32."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.norm(torch.tanh(self.fc(self.embed(tokens))))).mean(1)


@pytest.mark.parametrize("rule", ["ekfac", "sgd"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fallback_is_torch_sgd_bitwise(rule: str, nesterov: bool) -> None:
    torch.manual_seed(30)
    model = WithUntracked()
    hyper = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": nesterov}
    opt = kfe.KFEOptimizer(
        model,
        rule=rule,
        fallback="sgd",
        weight_decay_style="l2",
        factor_every=1,
        basis_every=2,
        lambda_every=1,
        damping=1e-2,
        **hyper,
    )
    tracked = {id(p) for b in opt.blocks for p in b.params}
    untracked = [p for p in model.parameters() if id(p) not in tracked]
    assert len(untracked) == 3  # embedding weight, LayerNorm weight and bias
    # the reference gets the same gradients each step, so only the update rule is compared
    twins = [nn.Parameter(p.detach().clone()) for p in untracked]
    ref = torch.optim.SGD(twins, **hyper)
    gen = _gen(31)
    for step in range(6):
        tokens = torch.randint(0, 11, (8, 5), generator=gen)
        Y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        ref.zero_grad()
        brute.cross_entropy(model(tokens), Y).backward()
        for p, q in zip(untracked, twins, strict=True):
            assert p.grad is not None
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(untracked, twins, strict=True):
            assert p.dtype == torch.float32
            assert torch.equal(p, q), f"step {step}: {(p - q).abs().max().item()}"
