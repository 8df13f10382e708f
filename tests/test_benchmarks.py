"""The benchmark scripts run (smoke size); they never assert on wall-clock time."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "suite",
    [[], ["--suite", "grid"], ["--suite", "grid", "--matmul-dtype", "bfloat16"]],
    ids=["default", "grid", "grid-bfloat16"],
)
def test_step_time_quick(tmp_path: Path, suite: list[str]) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_time.py"),
            "--quick",
            *suite,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "x Adam" in result.stdout
    data = json.loads(out.read_text())
    text = json.dumps(data)
    assert "adam" in text
    assert ('"matmul_dtype": "bfloat16"' in text) == ("bfloat16" in suite)
    numbers = [v for v in _walk(data) if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) or math.isnan(v) for v in numbers)


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def quick_json(tmp_path: Path, script: str) -> dict:
    """Run ``benchmarks/<script> --quick --json`` and return what it wrote."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())


def test_step_floor_quick(tmp_path: Path) -> None:
    numbers = quick_json(tmp_path, "step_floor.py")["ms_and_ratios"]
    assert set(numbers) >= {"plain_step", "factor_step", "matmuls", "adam", "matmul_floor"}
    assert all(math.isfinite(v) and v > 0 for v in numbers.values())


def test_conv_step_quick(tmp_path: Path) -> None:
    data = quick_json(tmp_path, "conv_step.py")["results"]
    assert set(data) == {"adam", "kfac", "ekfac", "ekfac-batch"}
    assert all(math.isfinite(v) and v > 0 for r in data.values() for v in r.values())


def test_memory_quick(tmp_path: Path) -> None:
    out = quick_json(tmp_path, "memory.py")
    data, dims, batch = out["results"], out["dims"], out["batch"]
    assert {"adam", "kfac-split", "ekfac-ema", "ekfac-batch"} <= set(data)
    per_example = 4 * batch * max(d_out * (d_in + 1) for d_in, d_out in itertools.pairwise(dims))
    for name, r in data.items():
        assert 0 < r["largest_bytes"] < per_example / 8, name
        assert r["step_peak_bytes"]["plain"] <= r["state_bytes"] + r["param_bytes"], name
        if name.startswith(("kfe", "kfac", "ekfac")):
            assert r["capture_bytes"] > 0, name  # x and g held from backward to step
    adam, params = data["adam"]["state_bytes"], data["adam"]["param_bytes"]
    assert 2 * params <= adam <= 2 * params + 4 * 16  # exp_avg, exp_avg_sq, 16 step counters
    assert set(data["ekfac-batch"]["step_peak_bytes"]) == {"plain", "factor", "refresh"}
