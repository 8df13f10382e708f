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
    [
        [],
        ["--suite", "grid"],
        ["--suite", "grid", "--matmul-dtype", "bfloat16"],
        ["--suite", "grid", "--only", "ekfac-kfac", "--fp32-matmul-precision", "bf16"],
        ["--only", "ekfac-ema", "--compile"],
    ],
    ids=["default", "grid", "grid-bfloat16", "grid-fp32-bf16", "compile"],
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
    assert "captured nothing" not in result.stdout + result.stderr  # compiled: hooks traced
    data = json.loads(out.read_text())
    text = json.dumps(data)
    assert "adam" in text
    assert ('"matmul_dtype": "bfloat16"' in text) == ("bfloat16" in suite)
    if "bf16" in suite:  # the KFE entry was built with it
        assert data["optimizers"]["ekfac-kfac"]["settings"]["fp32_matmul_precision"] == "bf16"
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


def test_precision_quick(tmp_path: Path) -> None:
    data = quick_json(tmp_path, "precision.py")
    errors = {row["setting"]: row["rel_error"] for row in data["ekfac_step"]}
    assert set(errors) == {"float32 (ieee)", "fp32_matmul_precision=bf16", "matmul_dtype=bfloat16"}
    # float32 against float64 on a small model: a few ulps, bfloat16 a few 2^-9
    assert errors["float32 (ieee)"] < 1e-4 and 1e-5 < errors["matmul_dtype=bfloat16"] < 0.1
    for row in data["kfac_split"]:
        split = row["largest_rel_error"]
        assert split["shortcut, float32 (ieee)"] < 1e-4, row
        assert 1e-5 < split["shortcut, bfloat16 operands"] < 0.5, row
        assert 1e-5 < split["KFE path, bfloat16 operands"] < 0.5, row
