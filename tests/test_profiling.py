"""``kfe/profiling.py``: traces TensorBoard's profiler plugin loads, and a phase table
whose rows add up to the measured step time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfe import KFEOptimizer
from kfe.profiling import CLOSURE_TOLERANCE, PHASES, PhaseTable, profile_steps

ROOT = Path(__file__).resolve().parents[1]
# kfe/comm: distributed runs only; kfe/rotate: rules with the rotate policy (not ekfac)
STEP_PHASES = [p for p in PHASES if p not in ("kfe/comm", "kfe/rotate")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(registry, out: Path, fisher: str = "empirical", rule: str = "ekfac") -> PhaseTable:
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 4))
    opt = KFEOptimizer(
        model,
        rule=rule,
        factor_every=1,
        basis_every=1,
        lambda_every=1,
        fisher=fisher,
        registry=registry,
    )
    X, Y = torch.randn(16, 6), torch.randint(0, 4, (16,))

    def step(i: int) -> None:
        opt.zero_grad()
        logits = model(X)
        if fisher == "true":
            opt.sample_fisher(logits, "cross_entropy")
        F.cross_entropy(logits, Y).backward()
        opt.step()

    return profile_steps(step, out, wait=1, warmup=1, active=2)


def test_trace_loads_in_tensorboard_plugin_and_table_adds_up(registry, tmp_path: Path) -> None:
    tb = pytest.importorskip(
        "torch_tb_profiler.profiler.data",
        reason="torch-tb-profiler (the 'profile' extra) is needed to load traces",
    )
    run_generator = pytest.importorskip("torch_tb_profiler.profiler.run_generator")
    consts = pytest.importorskip("torch_tb_profiler.consts")

    table = _profile(registry, tmp_path / "trace")

    # the trace: written by tensorboard_trace_handler, parsed by the plugin's own code
    files = sorted((tmp_path / "trace").glob("*.pt.trace.json*"))
    assert files and list(table.trace_files) == files
    path = files[0]
    match = consts.WORKER_PATTERN.match(path.name)
    assert match is not None
    worker, span = match.group(1), match.group(2)
    data = tb.RunProfileData.parse(worker, span, str(path), str(tmp_path))
    assert len(data.steps_names) == 2  # the two active profiler steps
    run = run_generator.RunGenerator(worker, span, data).generate_run_profile()
    assert {v.name for v in run.views} >= {"overall", "operator", "trace"}

    # every phase range is in the raw trace
    events = json.loads(path.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(STEP_PHASES) <= names
    assert sum(1 for n in names if str(n).startswith("ProfilerStep#")) == 2

    # the table: every phase fired, and the accounting closes
    assert table.steps == 2 and table.timeline == "host"
    assert [r.name for r in table.rows] == STEP_PHASES
    for row in table.rows:
        assert row.calls > 0 and row.total_ms >= row.self_ms >= 0
    assert table.row("kfe/eigh").calls == 2  # one per tracked layer
    assert table.row("kfe/fallback").calls == 2  # LayerNorm weight and bias
    assert table.step_ms > 0 and table.rest_ms > 0
    total = table.attributed_ms + table.remainder_ms
    assert abs(total - table.step_ms) <= CLOSURE_TOLERANCE * table.step_ms, table.format()
    assert table.closure_error <= CLOSURE_TOLERANCE
    text = table.format()
    assert "| kfe/eigh |" in text and "**step**" in text
    d = table.to_dict()
    assert set(d["phases"]) == set(STEP_PHASES)
    json.dumps(d)


def test_nested_capture_is_counted_once(registry, tmp_path: Path) -> None:
    """True Fisher: ``sample_fisher``'s ``kfe/capture`` holds the per-layer ones."""
    table = _profile(registry, tmp_path / "trace", fisher="true")
    capture = table.row("kfe/capture")
    assert capture.calls == 3  # two forward hooks + one sample_fisher per step
    assert capture.total_ms == pytest.approx(capture.self_ms)
    assert table.closure_error <= CLOSURE_TOLERANCE


def test_rotate_policy_has_its_range(registry, tmp_path: Path) -> None:
    """``adam`` (``rotate``) carries its first moment at each refresh inside ``kfe/rotate``,
    once per tracked layer at each refresh (here every step); the accounting closes."""
    table = _profile(registry, tmp_path / "trace", rule="adam")
    assert table.row("kfe/rotate").calls == 2  # per step: one per tracked layer
    assert table.closure_error <= CLOSURE_TOLERANCE


def test_gpu_profile_script_quick(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_profile.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "traces"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "CPU run" in result.stdout and "## torch-adam" in result.stdout
    data = json.loads(out.read_text())
    assert set(data["tables"]) == {"ekfac", "kfe-adam", "torch-adam"}
    assert set(data["tables"]["ekfac"]["phases"]) >= set(STEP_PHASES) - {"kfe/fallback"}
    for name in data["tables"]:
        assert list((tmp_path / "traces" / name).glob("*.pt.trace.json*"))


def test_phase_records_only_under_a_profiler() -> None:
    from torch.profiler import profile

    from kfe.profiling import phase

    with phase("kfe/idle") as idle:
        assert idle is None  # the shared no-op context: no range, no dispatcher call
    with profile() as prof, phase("kfe/seen"):
        torch.ones(1).add_(1)
    assert "kfe/seen" in {e.name for e in prof.events()}
