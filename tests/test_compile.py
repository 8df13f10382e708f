"""``torch.compile``: a compiled model trains with kfe exactly as the eager one.

kfe's capture is forward hooks on the tracked modules plus tensor hooks on their
outputs. Dynamo traces the idle hooks into one graph and breaks the graph at each
tracked module on statistic steps (the hooks' side effects). The tests pin both: the
parameters after several steps across every cadence match eager bit for bit under
``aot_eager`` (the same kernels, so any lost capture shows), and closely under
``inductor`` (fused kernels round differently); an idle step is one graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import yaml
from torch import nn
from torch._dynamo.utils import counters

from kfe import KFEOptimizer
from kfe.cli import main
from tests.test_contract import SETTINGS, data, make_model
from tests.tiny import TINY_RUN


def train(
    rule: Any,
    backend: str | None,
    *,
    wrap_first: bool = False,
    steps: int = 7,
    dtype: torch.dtype = torch.float32,
    **extra: Any,
) -> tuple[list[torch.Tensor], list[float]]:
    """Train ``make_model()`` for ``steps`` steps; return its parameters and losses.

    ``backend`` None is eager; ``wrap_first`` builds the optimizer on the compiled
    module instead of compiling after the optimizer has hooked the eager one.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make_model().to(dtype)
    net: nn.Module = model
    if backend is not None and wrap_first:
        net = torch.compile(model, backend=backend)
    opt = KFEOptimizer(net, rule=rule, **{**SETTINGS, **extra})
    if backend is not None and not wrap_first:
        net = torch.compile(model, backend=backend)
    x, y = data()
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        if extra.get("fisher") == "true":
            opt.sample_fisher(out, "cross_entropy", generator=gen)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses


CASES = [
    pytest.param("ekfac", {}, id="ekfac-ema"),
    pytest.param({"name": "ekfac", "estimator": "batch"}, {}, id="ekfac-batch"),
    pytest.param("kfac", {}, id="kfac"),
    pytest.param("ekfac", {"fisher": "true"}, id="ekfac-true-fisher"),
]


@pytest.mark.parametrize(("rule", "extra"), CASES)
def test_aot_eager_matches_eager_bit_for_bit(rule: Any, extra: dict[str, Any]) -> None:
    want, want_losses = train(rule, None, **extra)
    got, got_losses = train(rule, "aot_eager", **extra)
    assert got_losses == want_losses
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_optimizer_built_on_the_compiled_module() -> None:
    want, _ = train("ekfac", None)
    got, _ = train("ekfac", "aot_eager", wrap_first=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_idle_step_is_one_graph_and_statistic_step_breaks_at_tracked_layers() -> None:
    torch._dynamo.reset()
    model = make_model()
    opt = KFEOptimizer(model, rule="ekfac", **SETTINGS)
    x, _ = data()
    opt.capture.active = False
    idle = torch._dynamo.explain(model)(x)
    assert (idle.graph_count, idle.graph_break_count) == (1, 0)
    opt.capture.active = True
    busy = torch._dynamo.explain(model)(x)
    assert busy.graph_count > 1  # documented in docs/optimizer.md#torchcompile


@pytest.mark.slow
def test_inductor_matches_eager() -> None:
    """Inductor's fused kernels round differently, so the runs are compared in float64
    with every statistic fresh each step. With a stale basis the comparison would not
    hold for any two roundings: the 108-wide layer's ``A`` has rank 16 here, and a
    Lambda estimated from new inputs in the old basis depends on which basis the eigh
    picked inside its null space (eager itself moves by 3e-3 after three steps when the
    weights move by 1e-14 relative)."""
    fresh = dict(factor_every=1, basis_every=1, lambda_every=1, dtype=torch.float64)
    want, want_losses = train("ekfac", None, **fresh)
    got, got_losses = train("ekfac", "inductor", **fresh)
    assert got_losses == pytest.approx(want_losses, rel=1e-9)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_kfe_train_with_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kfe train`` with ``compile: true`` trains through dynamo (frames counted) and
    ends where eager training ends, to float32 rounding (fresh statistics each step),
    even after a compiled run of the same network class without kfe's hooks in the
    same process (an ablation worker's previous run)."""
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # default
    config = {
        **TINY_RUN,
        "optimizer": {**TINY_RUN["optimizer"], "factor_every": 1, "basis_every": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    torch._dynamo.reset()
    counters.clear()
    assert main(["train", str(path), "--out", str(tmp_path / "eager")]) == 0
    assert not counters["stats"]["unique_graphs"]
    adam = ["--set", "optimizer={type: torch, name: adam, lr: 0.001}", "--set", "compile=true"]
    assert main(["train", str(path), "--out", str(tmp_path / "adam"), *adam]) == 0
    argv = ["train", str(path), "--out", str(tmp_path / "compiled"), "--set", "compile=true"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*captured nothing")
        assert main(argv) == 0
    assert counters["stats"]["unique_graphs"] >= 3  # Adam's, kfe's idle and statistic steps
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] > 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6)


def test_a_model_traced_before_kfe_hooked_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default dynamo does not guard on module hooks, so a model compiled and run
    before the optimizer hooked it keeps its hookless graph: kfe says so, naming the
    fix, and with the fix the run equals eager bit for bit."""

    def run(after_trace: bool) -> list[torch.Tensor]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = make_model()
        net = torch.compile(model, backend="aot_eager")
        x, y = data()
        if after_trace:
            net(x)
        opt = KFEOptimizer(model, rule="ekfac", **SETTINGS)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # default
    with pytest.warns(RuntimeWarning, match="skip_nnmodule_hook_guards"):
        run(after_trace=True)
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False)
    want = run(after_trace=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*captured nothing")
        got = run(after_trace=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_starting_a_profiler_does_not_recompile() -> None:
    """The capture hooks' profiler ranges stay out of the trace (``kfe.profiling.phase``):
    a profiled window of a compiled model runs the graphs compiled before it."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = make_model()
    opt = KFEOptimizer(model, rule="ekfac", **{**SETTINGS, "factor_every": 1})
    net = torch.compile(model, backend="aot_eager")
    x, y = data()

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    step()
    compiled = counters["stats"]["unique_graphs"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    assert counters["stats"]["unique_graphs"] == compiled
    assert any(e.name == "kfe/lambda" for e in prof.events())  # the step's ranges remain
