"""``matmul_dtype``: the step's large matmuls outside the factors in a lower precision.

Against the brute-force twins of ``tests/test_brute_force.py`` (float64, dense Fisher
from ``torch.func``): with ``bfloat16`` matmuls (8 significant bits) the factors and
their eigenbasis stay exact, Lambda and the EKFAC update agree to bfloat16's rounding
and visibly differ from the exact ones (so the lowered path really ran); state and
update stay in the parameters' dtype; every matmul of a step other than the factors'
runs in the lowered dtype; and the check that lets the projected gradient come from the
captures stays exact.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import kfe
from kfe.state_keys import BASIS, FACTOR_A, FACTOR_B
from tests.test_brute_force import (  # _one_thread: the same autouse fixture here
    CASES,
    REGISTRY,
    _one_thread,  # noqa: F401
    assert_close,
    assert_eigenbasis,
    dense_of,
    one_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

BF16_REL = 3e-2
"""Tolerance relative to the largest entry: bfloat16 rounds each input to ``2^-9``
relative; sums of such products stay within a few of that of the largest entry."""


@pytest.mark.parametrize("case_name", ["linear_bias", "linear_sequence", "conv_stride2"])
def test_bfloat16_matches_dense_twins_to_its_rounding(case_name: str) -> None:
    ref = dense_of(case_name)
    damping = 2e-2
    case = CASES[case_name]()
    rule = {"name": "ekfac", "estimator": "batch"}
    opt, D = one_step(case, rule, damping, matmul_dtype="bfloat16")
    cur = kfe.inspect_layer(opt, case.name)
    assert cur.A is not None and cur.B is not None and cur.diagonal is not None
    # factors and their eigenbasis: exact, in the parameters' dtype
    assert cur.A.dtype == cur.B.dtype == torch.float64
    assert_close(cur.A, ref.A)
    assert_close(cur.B, ref.B)
    assert_eigenbasis(cur.basis.U_A, cur.basis.a, ref.A)
    assert_eigenbasis(cur.basis.U_B, cur.basis.b, ref.B)
    U = torch.kron(cur.basis.U_B, cur.basis.U_A)
    lam = torch.diagonal(U.mT @ ref.F @ U)
    assert_close(cur.diagonal.reshape(-1), lam, rel=BF16_REL)
    expected = U @ ((U.mT @ ref.grad) / (lam + damping))
    assert_close(D.reshape(-1), expected, rel=BF16_REL)
    # ... and not exactly: the lowered path ran (float64 agrees to 1e-9, see test_brute_force)
    assert (D.reshape(-1) - expected).abs().max() > 1e-6 * expected.abs().max()
    assert (cur.diagonal.reshape(-1) - lam).abs().max() > 1e-6 * lam.abs().max()


class _Matmuls(TorchDispatchMode):
    """Counts matmul-family ops by the dtypes of their tensor arguments."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul")

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[tuple[str, tuple[torch.dtype, ...]]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            self.seen[name, tuple(a.dtype for a in args if isinstance(a, Tensor))] += 1
        return func(*args, **(kwargs or {}))


def _cadenced(model: nn.Module, rule: Any, basis: str, **settings: Any) -> kfe.KFEOptimizer:
    """Factors every 2 steps, a refresh every 4, Lambda every step."""
    return kfe.KFEOptimizer(
        model,
        registry=REGISTRY,
        rule=rule,
        basis=basis,
        lr=1e-3,
        factor_every=2,
        basis_every=4,
        lambda_every=1,
        **settings,
    )


@pytest.mark.parametrize(
    ("rule", "basis"),
    [
        ({"name": "ekfac", "estimator": "batch"}, "kfac"),
        ("adam", "shampoo"),
        ("kfac", "kfac"),
        ({"name": "kfac", "damping_mode": "split"}, "kfac"),
    ],
)
@pytest.mark.parametrize("matmul_dtype", ["bfloat16", None])
def test_every_matmul_of_a_step_runs_in_the_matmul_dtype(
    rule: Any, basis: str, matmul_dtype: str | None
) -> None:
    """On a step that updates Lambda but neither the factors nor the basis (whose Gram
    matrices, eigendecomposition and eigenvector matching stay in the parameters'
    dtype) every matmul, Lambda's and the projections, runs in ``matmul_dtype``;
    without it, in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 10))
    opt = _cadenced(model, rule, basis, matmul_dtype=matmul_dtype)
    x = torch.randn(64, 30)
    for step in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step < 3:
            opt.step()
            continue
        seen = _Matmuls()
        with seen:
            opt.step()  # step 3: Lambda and projections; no factors, no refresh
    want = torch.bfloat16 if matmul_dtype else torch.float32
    assert seen.seen, "no matmul seen"
    assert all(set(dtypes) == {want} for _, dtypes in seen.seen), dict(seen.seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for st in opt.state.values():
        for value in (*st.values(), *st[kfe.state_keys.BASIS].values()):
            if isinstance(value, Tensor):
                assert value.dtype == torch.float32


def test_gradient_from_captures_is_checked_before_rounding() -> None:
    """The projected gradient comes from the (rounded) captures only where ``.grad`` is
    exactly their sum: a 0.1% rescale of ``.grad``, below bfloat16's rounding, is still
    caught, because the check runs on the captures before they are rounded."""
    used = {}
    for clip in (1.0, 0.999):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 10))
        opt = kfe.KFEOptimizer(
            model,
            registry=REGISTRY,
            rule={"name": "ekfac", "estimator": "batch"},
            factor_every=1,
            basis_every=2,
            lambda_every=1,
            matmul_dtype="bfloat16",
        )
        x = torch.randn(64, 30)
        for _ in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(clip)
            opt.step()
        used[clip] = opt.gradients_from_captures
    assert used[1.0] > 0, "a plain loop must reuse the captures"
    assert used[0.999] == 0, "a touched .grad must be rotated itself"


def test_float64_parameters_with_bfloat16_matmuls_keep_float64_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = kfe.KFEOptimizer(
        model,
        registry=REGISTRY,
        rule="adam",
        basis="shampoo",
        matmul_dtype="bfloat16",
        factor_every=1,
        basis_every=2,
    )
    x = torch.randn(16, 6, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(p.dtype == torch.float64 and p.isfinite().all() for p in model.parameters())
    st = opt.state[model[0].weight]
    assert st[kfe.state_keys.FACTOR_A].dtype == torch.float64
    assert st[kfe.state_keys.BASIS]["U_A"].dtype == torch.float64


def test_matmul_dtype_is_validated() -> None:
    with pytest.raises(ValidationError, match="matmul_dtype") as err:
        kfe.KFEOptimizer(nn.Linear(3, 2), registry=REGISTRY, matmul_dtype="float8")
    assert "bfloat16" in str(err.value) and "float16" in str(err.value)


@pytest.mark.parametrize("case_name", ["linear_bias", "conv_stride2"])
def test_bfloat16_kfac_split_is_the_dense_solve_to_its_rounding(case_name: str) -> None:
    """With ``matmul_dtype`` the split-damped K-FAC update takes the KFE path (rotations
    by the eigenvectors, lowered) instead of the cached inverses (not lowered); it is
    still ``((A + d_A I) (x) (B + d_B I))^{-1} grad`` to bfloat16's rounding."""
    ref = dense_of(case_name)
    case = CASES[case_name]()
    rule = {"name": "kfac", "damping_mode": "split", "pi_correction": False}
    damping = 2e-2
    _, D = one_step(case, rule, damping, matmul_dtype="bfloat16")
    root = damping**0.5
    eye_A, eye_B = torch.eye(ref.A.shape[0], dtype=ref.A.dtype), torch.eye(ref.B.shape[0])
    dense = torch.kron(ref.B + root * eye_B.to(ref.B.dtype), ref.A + root * eye_A)
    expected = torch.linalg.solve(dense, ref.grad)
    assert_close(D.reshape(-1), expected, rel=BF16_REL)
    assert (D.reshape(-1) - expected).abs().max() > 1e-6 * expected.abs().max()


# -- fp32_matmul_precision: the backend's float32 matmul precision, scoped -----------


class _Precisions(TorchDispatchMode):
    """Records the oneDNN float32 matmul precision in force at each matmul-family op
    (``mv``: the capture check's matrix-vector products) and at each ``linalg_eigh``."""

    OPS = (*_Matmuls.OPS, "mv", "_linalg_eigh")

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            self.seen[name, torch.backends.mkldnn.matmul.fp32_precision] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("rule", "basis"),
    [
        ({"name": "ekfac", "estimator": "batch"}, "kfac"),
        ("adam", "shampoo"),
        ({"name": "kfac", "damping_mode": "split"}, "kfac"),
    ],
)
def test_fp32_matmul_precision_is_set_around_the_lowered_matmuls_only(
    rule: Any, basis: str
) -> None:
    """``fp32_matmul_precision="bf16"`` is in force for exactly the matmuls
    ``matmul_dtype`` lowers and a rule's shortcut: on a step with neither factors nor a
    refresh every matmul (Lambda, the projections, ``kfac`` split's products with its
    inverse factors) runs under it and the capture check's products do not; on a factor
    and refresh step the factors and the basis are bit for bit those of a run without it
    (Gram matrices and ``eigh`` at the process's setting); after every step the
    process's setting is back."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 10))
    x = torch.randn(64, 30)
    opts, seen = {}, {}
    for precision in (None, "bf16"):
        model = copy.deepcopy(base)
        opt = opts[precision] = _cadenced(model, rule, basis, fp32_matmul_precision=precision)
        for step in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            seen[precision, step] = _Precisions()
            with seen[precision, step]:
                opt.step()
            assert torch.backends.mkldnn.matmul.fp32_precision == "none"
            assert torch.backends.cuda.matmul.fp32_precision == "none"
            if step == 0:  # factors, refresh and Lambda from the same captures
                first = opt.state[model[0].weight]
                if precision is None:
                    factors = {k: first[k].clone() for k in (FACTOR_A, FACTOR_B)}
                    eigen = {k: v.clone() for k, v in first[BASIS].items()}
                else:
                    for k, v in factors.items():
                        assert torch.equal(first[k], v), k
                    for k, v in eigen.items():
                        assert torch.equal(first[BASIS][k], v), k
    lowered = seen["bf16", 3]
    matmuls = {op: p for op, p in lowered.seen if op in _Matmuls.OPS}
    assert matmuls and set(matmuls.values()) == {"bf16"}, dict(lowered.seen)
    checks = {p for op, p in lowered.seen if op == "mv"}
    assert checks <= {"none"}, dict(lowered.seen)
    if basis == "kfac" and isinstance(rule, dict) and rule["name"] == "ekfac":
        assert checks, "the capture check ran (ekfac reads the captures)"
    refresh = seen["bf16", 0].seen
    assert refresh["_linalg_eigh", "bf16"] == 0 and refresh["_linalg_eigh", "none"] > 0
    assert any(p == "none" for op, p in refresh if op in _Matmuls.OPS), dict(refresh)
    assert {p for _, p in seen[None, 3].seen} == {"none"}
    # the shortcut runs (under the lowered setting: every matmul of step 3 above)
    if rule == {"name": "kfac", "damping_mode": "split"}:
        assert _shortcut_state(opts[None], base) and _shortcut_state(opts["bf16"], base)


def _shortcut_state(opt: kfe.KFEOptimizer, base: nn.Module) -> bool:
    """Whether ``kfac`` split's inverse cache was built (its shortcut ran)."""
    (first,) = [p for p in opt.param_groups[0]["params"] if p.shape == base[0].weight.shape]
    return any(isinstance(v, Tensor) for v in opt.state[first][kfe.state_keys.RULE].values())


def test_fp32_matmul_precision_restores_what_it_found() -> None:
    """Nested, with a non-default outer value, and through an exception."""
    from kfe.precision import fp32_matmul_precision

    mkldnn, cuda = torch.backends.mkldnn.matmul, torch.backends.cuda.matmul
    try:
        mkldnn.fp32_precision = cuda.fp32_precision = "tf32"
        with pytest.raises(RuntimeError, match="inside"), fp32_matmul_precision("bf16"):
            assert (mkldnn.fp32_precision, cuda.fp32_precision) == ("bf16", "tf32")
            with fp32_matmul_precision("ieee"):
                assert (mkldnn.fp32_precision, cuda.fp32_precision) == ("ieee", "ieee")
            assert (mkldnn.fp32_precision, cuda.fp32_precision) == ("bf16", "tf32")
            raise RuntimeError("inside")
        assert (mkldnn.fp32_precision, cuda.fp32_precision) == ("tf32", "tf32")
        with fp32_matmul_precision(None):
            assert mkldnn.fp32_precision == "tf32"
    finally:
        mkldnn.fp32_precision = cuda.fp32_precision = "none"


def _float32_case(case_name: str) -> Any:
    """A brute-force case with its model and data in float32 (the float64 twin stays the
    reference): ``fp32_matmul_precision`` acts on float32 matmuls only."""
    case = CASES[case_name]()
    case.model.float()
    case.X = case.X.float()
    case.Y = case.Y.float() if case.Y.is_floating_point() else case.Y
    return case


@pytest.mark.parametrize("case_name", ["linear_bias", "conv_stride2"])
def test_fp32_matmul_precision_kfac_split_shortcut_is_the_dense_solve(case_name: str) -> None:
    """The split-damped K-FAC shortcut (products with the cached inverse factors) runs
    under ``bf16`` and is still ``((A + d_A I) (x) (B + d_B I))^{-1} grad``."""
    ref = dense_of(case_name)
    case = _float32_case(case_name)
    rule = {"name": "kfac", "damping_mode": "split", "pi_correction": False}
    damping = 2e-2
    opt, D = one_step(case, rule, damping, fp32_matmul_precision="bf16")
    cache = opt.state[case.layer.weight][kfe.state_keys.RULE]  # the shortcut's inverses
    assert any(isinstance(v, Tensor) for v in cache.values())
    root = damping**0.5
    eye_A, eye_B = torch.eye(ref.A.shape[0], dtype=ref.A.dtype), torch.eye(ref.B.shape[0])
    dense = torch.kron(ref.B + root * eye_B.to(ref.B.dtype), ref.A + root * eye_A)
    assert_close(D.double().reshape(-1), torch.linalg.solve(dense, ref.grad), rel=BF16_REL)


@pytest.mark.parametrize("case_name", ["linear_bias", "conv_stride2"])
def test_fp32_matmul_precision_matches_dense_twins(case_name: str) -> None:
    """A float32 ``ekfac`` step with ``bf16`` float32 matmuls against the float64
    brute-force twins, to the accuracy oneDNN promises (bfloat16 inputs); state and
    update stay float32."""
    ref = dense_of(case_name)
    case = _float32_case(case_name)
    damping = 2e-2
    opt, D = one_step(
        case, {"name": "ekfac", "estimator": "batch"}, damping, fp32_matmul_precision="bf16"
    )
    cur = kfe.inspect_layer(opt, case.name)
    assert cur.diagonal is not None and cur.diagonal.dtype == D.dtype == torch.float32
    U = torch.kron(cur.basis.U_B.double(), cur.basis.U_A.double())
    lam = torch.diagonal(U.mT @ ref.F @ U)
    assert_close(cur.diagonal.double().reshape(-1), lam, rel=BF16_REL)
    expected = U @ ((U.mT @ ref.grad) / (lam + damping))
    assert_close(D.double().reshape(-1), expected, rel=BF16_REL)


def test_fp32_matmul_precision_is_validated() -> None:
    with pytest.raises(ValidationError, match="fp32_matmul_precision") as err:
        kfe.KFEOptimizer(nn.Linear(3, 2), registry=REGISTRY, fp32_matmul_precision="fp16")
    assert all(v in str(err.value) for v in ("'ieee'", "'bf16'", "'tf32'"))
