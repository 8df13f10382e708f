"""A built wheel holds every module of the source tree (a non-editable install works).

The README installs in editable mode, which reads the source folders directly and so
cannot show a module missing from ``[tool.setuptools] packages``; this builds the wheel
as ``pip install .`` would and imports the command's modules from it alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as
PACKAGES = {"kfe": "kfe", "plugins": "kfe_plugins"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a clean copy (a stale ``build/`` would hide a missing module)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("kfe-*.whl")
    return path


def test_wheel_holds_every_source_module(wheel: Path) -> None:
    expected = {
        f"{name}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, name in PACKAGES.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix == ".py" or path.name == "py.typed"
    }
    with zipfile.ZipFile(wheel) as zf:
        held = set(zf.namelist())
    assert not expected - held, f"missing from the wheel: {sorted(expected - held)}"
    tops = {n.split("/")[0] for n in held if "/" in n and ".dist-info/" not in n}
    assert tops == {"kfe", "kfe_plugins"}, tops  # no generic top-level ``plugins``


def test_command_imports_from_the_wheel_alone(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    modules = ["kfe", "kfe.cli", "kfe.data", "kfe.experiment.train", "kfe.models", "kfe_plugins"]
    # every module from the unpacked wheel, not from the editable install's source folders
    code = f"import importlib\nfor m in {modules}: print(importlib.import_module(m).__file__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert len(files) == len(modules)
    assert all(f.startswith(str(tmp_path / "site")) for f in files), files
