"""The per-block pieces the optimizer's pipeline calls, each on its own.

``fold_factors`` (the factor EMAs and ``factor_init``'s prior), ``solve_factor`` (an
eigenbasis that keeps the old order), ``captures_sum_to`` (the check that lets the
Lambda phase reuse the rotated captures) and ``apply_update`` (momentum and weight decay
as ``torch.optim.SGD`` / ``AdamW``). The optimizer-level tests cover them in the
pipeline; these pin each contract directly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kfe import state_keys as K
from kfe.refresh import fold_factors, solve_factor
from kfe.statistics import captures_sum_to
from kfe.update import Update, apply_update

DT = torch.float64


def spd(d: int, seed: int) -> torch.Tensor:
    m = torch.randn(d, d, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return m @ m.T / d


def test_fold_factors_copies_first_then_averages() -> None:
    st: dict[str, Any] = {}
    A1, B1, A2, B2 = spd(3, 0), spd(2, 1), spd(3, 2), spd(2, 3)
    assert fold_factors(st, A1.clone(), B1.clone(), decay=0.9)  # the first is kept as is
    assert torch.equal(st[K.FACTOR_A], A1) and torch.equal(st[K.FACTOR_B], B1)
    assert fold_factors(st, A2, B2, decay=0.9)
    torch.testing.assert_close(st[K.FACTOR_A], 0.9 * A1 + 0.1 * A2)
    torch.testing.assert_close(st[K.FACTOR_B], 0.9 * B1 + 0.1 * B2)
    assert K.FACTOR_PRIOR not in st


def test_fold_factors_from_a_scaled_identity_records_what_is_left_of_it() -> None:
    st: dict[str, Any] = {}
    A1, B1, A2, B2 = spd(3, 0), spd(2, 1), spd(3, 2), spd(2, 3)
    fold_factors(st, A1, B1, decay=0.5, start=(2.0, 8.0))  # folded into 2 I, 8 I
    fold_factors(st, A2, B2, decay=0.5, start=(2.0, 8.0))
    eye3, eye2 = torch.eye(3, dtype=DT), torch.eye(2, dtype=DT)
    torch.testing.assert_close(st[K.FACTOR_A], 0.5 * eye3 + 0.25 * A1 + 0.5 * A2)
    torch.testing.assert_close(st[K.FACTOR_B], 2.0 * eye2 + 0.25 * B1 + 0.5 * B2)
    assert st[K.FACTOR_PRIOR] == (0.5, 2.0)


def test_fold_factors_skips_non_finite_batch_factors() -> None:
    st: dict[str, Any] = {}
    fold_factors(st, spd(3, 0), spd(2, 1), decay=0.9)
    before = {k: v.clone() for k, v in st.items()}
    bad = spd(2, 2)
    bad[1, 1] = float("nan")
    assert not fold_factors(st, spd(3, 3), bad, decay=0.9)
    assert all(torch.equal(st[k], v) for k, v in before.items())


def test_solve_factor_keeps_eigenvectors_in_the_old_order() -> None:
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(0)))[0]
    new_values = torch.tensor([5.0, 0.5, 3.0, 1.5], dtype=DT)  # not in eigh's order
    factor = Q @ torch.diag(new_values) @ Q.T
    values, vectors = solve_factor(factor, Q, warm=False)  # type: ignore[misc]
    torch.testing.assert_close(values, new_values)
    torch.testing.assert_close(vectors.abs(), Q.abs())
    unaligned, _ = solve_factor(factor, Q, warm=False, align=False)  # type: ignore[misc]
    torch.testing.assert_close(unaligned, new_values.sort().values)  # eigh's own order


def test_solve_factor_warm_is_one_power_step_in_the_old_order() -> None:
    """``warm``: ``QR(F Q_old)`` with column signs and order following ``Q_old``, and the
    Rayleigh quotients of the old vectors as eigenvalues (no alignment needed)."""
    gen = torch.Generator().manual_seed(1)
    factor = spd(5, 2)
    old = torch.linalg.qr(torch.randn(5, 5, dtype=DT, generator=gen))[0]
    values, vectors = solve_factor(factor, old, warm=True)  # type: ignore[misc]
    torch.testing.assert_close(values, (old * (factor @ old)).sum(0).clamp(min=0))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(5, dtype=DT))
    # each new column lies in the span of the power step's columns up to it (in the old
    # order sorted by decreasing estimate): Q' R = F Q_old, column for column
    order = values.argsort(descending=True)
    power = (factor @ old)[:, order]
    R = vectors[:, order].T @ power
    torch.testing.assert_close(R, R.triu(), atol=1e-10, rtol=0)
    assert solve_factor(factor.float(), old.float(), warm=True)[0].dtype == torch.float32  # type: ignore[index]


def test_solve_factor_returns_none_on_a_non_finite_factor() -> None:
    factor = spd(3, 0)
    factor[0, 1] = factor[1, 0] = float("inf")
    assert solve_factor(factor, torch.eye(3, dtype=DT), warm=False) is None


def captured_linear(
    n: int = 7, d_in: int = 5, d_out: int = 3
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``.grad`` of a bias-free Linear under a summed loss, and its ``(x, g)``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, d_in, dtype=DT, generator=gen)
    w = torch.randn(d_out, d_in, dtype=DT, generator=gen, requires_grad=True)
    out = x @ w.T
    out.retain_grad()
    out.tanh().sum().backward()
    assert w.grad is not None and out.grad is not None
    return w.grad, [(x, out.grad)]


def test_captures_sum_to_the_gradient_they_make() -> None:
    grad, pairs = captured_linear()
    probe = torch.randn(grad.shape[1], dtype=DT)
    assert bool(captures_sum_to(grad, pairs, probe))
    ((x, g),) = pairs
    padded = torch.cat([x, torch.zeros(*x.shape[:-1], 3, dtype=DT)], dim=-1)
    assert bool(captures_sum_to(grad, [(padded, g)], probe))
    half = [(x[:4], g[:4]), (x[4:], g[4:])]  # two forwards add up as one batch
    assert bool(captures_sum_to(grad, half, probe))


@pytest.mark.parametrize("change", ["clipped", "missing forward", "other term"])
def test_captures_sum_to_refuses_a_changed_gradient(change: str) -> None:
    grad, pairs = captured_linear()
    probe = torch.randn(grad.shape[1], dtype=DT)
    if change == "clipped":
        grad = grad * 0.999
    elif change == "missing forward":
        ((x, g),) = pairs
        pairs = [(x[:6], g[:6])]
    else:
        grad = grad + 1e-3 * torch.randn_like(grad)
    assert not bool(captures_sum_to(grad, pairs, probe))


@pytest.mark.parametrize(("nesterov", "dampening"), [(False, 0.0), (False, 0.3), (True, 0.0)])
def test_apply_update_is_torch_sgd_with_momentum(nesterov: bool, dampening: float) -> None:
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(3, 4, dtype=DT, generator=gen)
    theirs = torch.nn.Parameter(ours.clone())
    group = {"lr": 0.1, "momentum": 0.9, "dampening": dampening, "nesterov": nesterov}
    group["weight_decay"] = 0.0
    sgd = torch.optim.SGD([theirs], **group)
    st: dict[str, Any] = {}
    for _ in range(4):
        grad = torch.randn(3, 4, dtype=DT, generator=gen)
        theirs.grad = grad.clone()
        sgd.step()
        apply_update(Update(st, group, grad, [ours], lambda d: [d], grad), decoupled_decay=True)
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)


def test_apply_update_decays_decoupled_as_adamw_does() -> None:
    p = torch.ones(3, dtype=DT)
    group = {"lr": 0.5, "momentum": 0.0, "dampening": 0.0, "nesterov": False}
    group["weight_decay"] = 0.1
    direction = torch.full((3,), 2.0, dtype=DT)
    apply_update(Update({}, group, direction, [p], lambda d: [d], direction), decoupled_decay=True)
    torch.testing.assert_close(p, torch.full((3,), 1 * (1 - 0.05) - 1.0, dtype=DT))
    q = torch.ones(3, dtype=DT)  # l2 style: the decay was in the gradient already
    apply_update(Update({}, group, direction, [q], lambda d: [d], direction), decoupled_decay=False)
    torch.testing.assert_close(q, torch.full((3,), 0.0, dtype=DT))
