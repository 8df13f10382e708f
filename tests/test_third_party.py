"""The example plugin in examples/kfe-lion, installed as a distribution (not imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer, json_schema, load_registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kfe-lion"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example into a fresh folder (offline: no build isolation)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
    )
    assert (target / "kfe_lion.py").exists()
    assert not any(target.glob("kfe_lion*.egg-link"))  # a real install, not a path hack
    return target


def test_lion_registers_through_its_entry_point(installed: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(installed))
    registry = load_registry()  # the `kfe` entry-point group of every distribution
    assert "lion" in registry.rules
    assert "lion" not in load_registry([]).rules
    schema = json.dumps(json_schema(registry))
    assert '"lion"' in schema and "EMA decay of the momentum" in schema

    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = x @ torch.randn(4, 2)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = KFEOptimizer(
        model,
        rule={"name": "lion", "beta1": 0.9},
        lr=3e-3,
        registry=registry,
        factor_every=1,
        basis_every=10,
    )
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # measured: 2.15 -> 0.28
    sys.modules.pop("kfe_lion", None)


@pytest.mark.slow
def test_lion_passes_the_conformance_suite(installed: Path) -> None:
    """The plugin's own test file: one import of kfe.testing, run as its author would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), *sys.path])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore",
            str(EXAMPLE / "tests"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=EXAMPLE,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "15 passed" in result.stdout  # 5 checks x 3 bases (kfac, shampoo, identity)
