"""``benchmarks/mnist_autoencoder.py --quick`` runs end to end (it never asserts on time).

The quick mode trains a width-0.1 auto-encoder on the first 2000 MNIST images (synthetic
images when MNIST is not installed) for 12 steps with every optimizer; here it must
write a JSON holding every optimizer's finite, non-empty curve and both plots.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mnist_autoencoder.py"
KFE_ROWS = ["kfac", "kfac-ident", "ekfac-ema", "ekfac-batch", "ekfac-ident"]
EXPECTED = ["sgd", "adam", *KFE_ROWS, "kfe-soap"]
HAS_SOAP = importlib.util.find_spec("pytorch_optimizer") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    """One ``--quick`` run shared by the tests: its stdout, JSON and plot folder."""
    out = tmp_path_factory.mktemp("mnist_benchmark")
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--json",
            str(out / "result.json"),
            "--plot",
            str(out / "plots"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((out / "result.json").read_text()), out / "plots"


def test_every_optimizer_has_a_finite_curve(quick_run: tuple[str, dict, Path]) -> None:
    _, data, _ = quick_run
    expected = EXPECTED + (["soap"] if HAS_SOAP else [])
    runs = {run["optimizer"]: run for run in data["runs"]}
    assert sorted(runs) == sorted(expected)
    for name, run in runs.items():
        # a diverged grid point is a result, not a failure; an exception is a failure
        assert run["status"] in ("ok", "diverged"), (name, run["message"])
        curve = run["curve"]
        assert curve and curve[0]["step"] == 0, name
        for point in curve:
            assert all(math.isfinite(point[k]) for k in ("step", "time", "loss")), (name, point)
        times = [p["time"] for p in curve]
        assert times == sorted(times), name
        assert run["train_time_s"] > 0, name
        if run["status"] == "ok":
            assert curve[-1]["step"] == data["settings"]["steps"], name
            assert math.isfinite(run["final_loss"]), name
    assert data["same_initial_weights"]
    assert len({run["init_checksum"] for run in data["runs"]}) == 1


def test_summary_and_report(quick_run: tuple[str, dict, Path]) -> None:
    stdout, data, _ = quick_run
    summary = data["summary"]
    assert summary["targets"]["adam"] is not None
    assert set(summary["best"]) == {run["optimizer"] for run in data["runs"]}
    assert "## Best grid point per optimizer" in stdout
    assert "estimated runtime" in stdout
    checks = {(c["target"], c["optimizer"]) for c in summary["checks"]}
    assert {(1, "ekfac-ema"), (1, "ekfac-batch")} <= checks
    if HAS_SOAP:
        assert {(2, "ekfac-ema"), (2, "ekfac-batch")} <= checks
    for check in summary["checks"]:
        assert ("MET" if check["met"] else "MISSED") in stdout


def test_plots_exist(quick_run: tuple[str, dict, Path]) -> None:
    _, _, plots = quick_run
    for name in ("loss_vs_time.png", "loss_vs_step.png"):
        path = plots / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_only_and_grid_flags(tmp_path: Path) -> None:
    """``--only`` runs a subset; ``--grid`` replaces a grid (two points here)."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--only",
            "adam,ekfac-ema",
            "--grid",
            "adam=1e-3,3e-3",
            "--grid",
            "ekfac-ema=0.05:1",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    points = [(r["optimizer"], r["lr"], r["damping"]) for r in data["runs"]]
    assert points == [("adam", 1e-3, None), ("adam", 3e-3, None), ("ekfac-ema", 0.05, 1.0)]
    assert [p["step"] for p in data["runs"][0]["curve"]] == [0, 2, 4]
    assert "n/a: SOAP was not run" in result.stdout
