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
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import kfe
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
    opt = kfe.KFEOptimizer(
        model,
        registry=REGISTRY,
        rule=rule,
        basis=basis,
        lr=1e-3,
        factor_every=2,
        basis_every=4,
        lambda_every=1,
        matmul_dtype=matmul_dtype,
    )
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
