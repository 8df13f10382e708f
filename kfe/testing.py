"""The conformance suite every rule x basis inherits.

A plugin author runs it in their own tests with one import and one class::

    from kfe.testing import RuleConformance

    class TestLion(RuleConformance):
        rules = ("lion",)          # default: every registered rule
        # plugins = [...]         # default: the installed ``kfe`` entry points

Pytest then runs each check below for every compatible (rule, basis) pair:

- ``test_converges``: a small regression problem (a teacher MLP) loses 90% of its
  loss within 100 steps for at least one lr in ``LRS`` and damping in ``DAMPINGS``;
- ``test_state_dict_roundtrip``: ``state_dict`` saved across a refresh, reloaded with
  ``torch.load(weights_only=True)`` into a fresh optimizer, continues bit for bit;
- ``test_keeps_dtype``: float64 and float32 models keep their parameter dtypes;
- ``test_finite_at_refresh``: singular factors (a constant input column and a dead
  output) at every refresh never make a parameter non-finite;
- ``test_lr_zero``: ``lr=0`` changes no parameter.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kfe.config import config_model
from kfe.optimizer import KFEOptimizer
from kfe.registry import Registry, load_registry

__all__ = ["DAMPINGS", "LRS", "RuleConformance", "compatible_cases"]

LRS = (1e-2, 1e-1, 1e-3, 1.0)
DAMPINGS = (1e-2, 1e-1, 1e-3)
CADENCE = {"factor_every": 1, "basis_every": 5, "lambda_every": 1}


def compatible_cases(
    registry: Registry, rules: Sequence[str] | None = None, bases: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Every (rule, basis) pair of ``registry`` that the config accepts."""
    model = config_model(registry)
    cases = []
    for rule in rules or sorted(registry.rules):
        for basis in bases or sorted(registry.bases):
            try:
                model.model_validate({"rule": rule, "basis": basis})
            except ValidationError:
                continue
            cases.append((rule, basis))
    return cases


def _model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2)).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        return x, teacher(x)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(model(x), y)


def _train(model: nn.Module, opt: KFEOptimizer, steps: int, x: Tensor, y: Tensor) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class RuleConformance:
    """Subclass as ``Test...`` in a test module to run the suite over rules x bases."""

    plugins: ClassVar[Sequence[object] | None] = None
    """Plugins to build the registry from; ``None``: the installed entry points."""
    rules: ClassVar[Sequence[str] | None] = None
    """Rules to check; ``None``: all registered."""
    bases: ClassVar[Sequence[str] | None] = None
    """Bases to check; ``None``: all registered."""
    settings: ClassVar[dict[str, Any]] = {}
    """Extra optimizer settings for every check (e.g. a rule's own fields via ``rule``)."""

    @classmethod
    def registry(cls) -> Registry:
        return load_registry(cls.plugins)

    def pytest_generate_tests(self, metafunc: Any) -> None:
        if "case" in metafunc.fixturenames:
            cases = compatible_cases(self.registry(), self.rules, self.bases)
            metafunc.parametrize("case", cases, ids=[f"{r}-{b}" for r, b in cases])

    def make(self, model: nn.Module, case: tuple[str, str], **settings: Any) -> KFEOptimizer:
        rule, basis = case
        merged = {"rule": rule, "basis": basis, **CADENCE, **self.settings, **settings}
        return KFEOptimizer(model, registry=self.registry(), **merged)

    def test_converges(self, case: tuple[str, str]) -> None:
        x, y = _data()
        results = {}
        for damping in DAMPINGS:
            for lr in LRS:
                model = _model()
                opt = self.make(model, case, lr=lr, damping=damping)
                with warnings.catch_warnings():
                    # a grid point may diverge (its steps are then skipped): only the
                    # best one must converge
                    warnings.filterwarnings("ignore", "non-finite gradient", RuntimeWarning)
                    losses = _train(model, opt, 100, x, y)
                with torch.no_grad():
                    final = _loss(model, x, y).item()
                results[lr, damping] = final
                if final == final and final < 0.1 * losses[0]:
                    return
        raise AssertionError(f"{case}: no (lr, damping) cut the loss by 90%: {results}")

    def test_state_dict_roundtrip(self, case: tuple[str, str]) -> None:
        x, y = _data()
        model = _model()
        opt = self.make(model, case, lr=1e-2, momentum=0.5)
        _train(model, opt, 7, x, y)  # refreshes at steps 0 and 5
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        clone = _model(seed=1)
        clone.load_state_dict(saved["model"])
        opt2 = self.make(clone, case, lr=1e-2, momentum=0.5)
        opt2.load_state_dict(saved["opt"])
        _assert_same(opt.state_dict(), opt2.state_dict(), case)
        _train(model, opt, 6, x, y)  # across the refresh at step 10
        _train(clone, opt2, 6, x, y)
        for a, b in zip(model.parameters(), clone.parameters(), strict=True):
            assert torch.equal(a, b), f"{case}: resumed run differs"

    def test_keeps_dtype(self, case: tuple[str, str]) -> None:
        for dtype in (torch.float64, torch.float32):
            x, y = _data(dtype)
            model = _model(dtype)
            _train(model, self.make(model, case, lr=1e-3), 6, x, y)
            assert all(p.dtype == dtype for p in model.parameters()), case

    def test_finite_at_refresh(self, case: tuple[str, str]) -> None:
        x, y = _data()
        x[:, 0] = 1.0  # a constant input column: A is singular
        y[:, 1] = 0.0
        model = _model()
        head = model[3]
        assert isinstance(head, nn.Linear)
        with torch.no_grad():
            head.weight[1].zero_()  # a dead output
            head.bias[1] = 0.0
        opt = self.make(model, case, lr=1e-2)
        for _ in range(11):  # refreshes at 0, 5, 10
            _train(model, opt, 1, x, y)
            assert all(torch.isfinite(p).all() for p in model.parameters()), case

    def test_lr_zero(self, case: tuple[str, str]) -> None:
        x, y = _data()
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, self.make(model, case, lr=0.0, weight_decay=0.1), 6, x, y)
        for a, b in zip(before, model.parameters(), strict=True):
            assert torch.equal(a, b), f"{case}: lr=0 changed a parameter"


def _assert_same(a: Any, b: Any, case: tuple[str, str]) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), case
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), case
        for key in a:
            _assert_same(a[key], b[key], case)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), case
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v, case)
    else:
        assert a == b or (a != a and b != b), case
