"""The ``kfe`` command end to end, in subprocesses, on tiny configs over real data
(scikit-learn's bundled digits): train, resume, ablate, report, and bad configs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY: dict[str, Any] = {
    "name": "tiny",
    "epochs": 2,
    "progress": False,
    "data": {"name": "digits", "train_limit": 256, "test_limit": 64, "batch_size": 64},
    "model": {"name": "mlp", "hidden": [16]},
    "optimizer": {
        "rule": "ekfac",
        "lr": 0.1,
        "damping": 0.01,
        "fisher": "true",
        "factor_every": 1,
        "basis_every": 3,
        "lambda_every": 2,
    },
}


def kfe(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kfe.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_checkpoint_and_summary(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", TINY)
    done = kfe("train", config, "--out", tmp_path / "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    metrics = rows(run)
    assert [r["epoch"] for r in metrics] == [0, 1, 2]
    assert [r["step"] for r in metrics] == [0, 4, 8]  # 256 examples / 64 per batch
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert 0 <= metrics[-1]["test_accuracy"] <= 1
    assert metrics[1]["time"] > 0 and metrics[2]["time"] > metrics[1]["time"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["label"] == "ekfac"
    assert list((run / "tb").iterdir()), "TensorBoard events missing"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["rule"]["name"] == "ekfac"


def test_bfloat16_precision_trains_under_autocast(tmp_path: Path) -> None:
    """``precision: bfloat16`` runs the forward passes under autocast (the losses differ
    from the float32 run's), still trains, and keeps the parameters float32."""
    config = write(tmp_path / "tiny.yaml", {**TINY, "epochs": 1})
    runs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        done = kfe("train", config, "--out", out, "--set", f"precision={precision}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs[precision] = [r["train_loss"] for r in rows(out)]
    low = runs["bfloat16"]
    assert low[-1] < low[0]
    assert low != runs["float32"]
    saved = torch.load(tmp_path / "bfloat16" / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved["model"].values())


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", TINY)
    whole = kfe("train", config, "--out", tmp_path / "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = kfe("train", config, "--out", tmp_path / "split", "--set", "epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rest = kfe("train", config, "--out", tmp_path / "split", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr

    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    for pa, pb in states:
        for key, value in pa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, pb[key]), key

    def losses(run: str) -> list[float]:
        return [r["train_loss"] for r in rows(tmp_path / run)]

    assert losses("whole") == losses("split")


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", {**TINY, "epochs": 1})
    assert kfe("train", config, "--out", tmp_path / "r", cwd=tmp_path).returncode == 0
    done = kfe(
        "train", config, "--out", tmp_path / "r", "--resume", "--set", "optimizer.lr=0.5",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "optimizer" in done.stderr and "Traceback" not in done.stderr


def test_ablate_grid_then_report(tmp_path: Path) -> None:
    ablation = {
        **TINY,
        "epochs": 1,
        "ablate": {
            "workers": 2,
            "variants": [
                {"name": "ekfac", "grid": {"optimizer.damping": [0.01, 0.1]}},
                {
                    "name": "kfac",
                    "set": {"optimizer.rule": "kfac"},
                    "grid": {"optimizer.damping": [0.01, 0.1]},
                },
            ],
            "grid": {"optimizer.lr": [0.03, 0.1]},
        },
    }
    config = write(tmp_path / "grid.yaml", ablation)
    out = tmp_path / "grid"
    done = kfe("ablate", config, "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with (out / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert len(results) == 8
    assert {r["status"] for r in results} == {"done"}
    assert {r["label"] for r in results} == {"ekfac", "kfac"}
    assert {(r["optimizer.lr"], r["optimizer.damping"]) for r in results} == {
        (lr, d) for lr in ("0.03", "0.1") for d in ("0.01", "0.1")
    }

    again = kfe("ablate", config, "--out", out, cwd=tmp_path)
    assert again.returncode == 0
    assert "8 already done" in again.stderr

    report = kfe("report", out, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    pngs = sorted((out / "report").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"loss_vs_epoch.png", "loss_vs_time.png", "envelope.png"} <= names
    assert any(n.startswith("sensitivity_") for n in names)
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png
    assert (out / "report" / "summary.md").read_text().strip()


BAD_CONFIGS = [
    ({"optimizer": {"rule": "adamax"}}, "optimizer", "ekfac"),  # unknown rule: lists them
    ({"epochs": "many"}, "epochs", "integer"),  # wrong type
    ({"optimiser": {"lr": 0.1}}, "optimiser", "unknown field"),  # unknown field
    ({"data": {"name": "cifar10", "data_dir": "EMPTY"}}, "data.name", "cifar"),  # missing data
    ({"data": {"name": "imagenet"}}, "data.name", "mnist"),  # unknown dataset: lists them
    ({"optimizer": {"type": "torch", "name": "sgd", "lr": -1}}, "optimizer.lr", "0"),
    ({"precision": "float16"}, "precision", "bfloat16"),  # not a listed value
]


@pytest.mark.parametrize(("change", "field", "hint"), BAD_CONFIGS)
def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, change: dict[str, Any], field: str, hint: str
) -> None:
    data = {**TINY, **change}
    if data["data"].get("data_dir") == "EMPTY":
        (tmp_path / "empty").mkdir()
        data["data"] = {**data["data"], "data_dir": str(tmp_path / "empty")}
    config = write(tmp_path / "bad.yaml", data)
    done = kfe("train", config, "--out", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert field in done.stderr and hint in done.stderr, done.stderr


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", TINY)
    done = kfe("train", config, "--set", "optimizer.rule=nope", cwd=tmp_path)
    assert done.returncode == 2 and "unknown rule 'nope'" in done.stderr
    missing = kfe("train", tmp_path / "absent.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_data_dir_flag_points_the_readers_at_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--data-dir DIR`` is searched for dataset files (fake CIFAR-10 batches here), as
    ``--set data.data_dir=DIR`` would be; a folder without them exits 2 naming it."""
    from tests.test_datasets import write_cifar

    monkeypatch.delenv("KFE_DATA_DIR", raising=False)
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", n=8)
    (tmp_path / "empty").mkdir()
    tiny = {**TINY, "epochs": 1, "data": {"name": "cifar10", "batch_size": 20}}
    config = write(tmp_path / "cifar.yaml", tiny)
    done = kfe(
        "train", config, "--out", tmp_path / "r", "--data-dir", tmp_path / "data", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in rows(tmp_path / "r")] == [0, 2]  # 5 batches x 8 / 20
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["data"]["data_dir"] == str(tmp_path / "data")
    empty = kfe(
        "train", config, "--out", tmp_path / "e", "--data-dir", tmp_path / "empty", cwd=tmp_path
    )
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert "data.name" in empty.stderr and str(tmp_path / "empty") in empty.stderr


def test_rules_and_schema_list_the_registered_plugins(tmp_path: Path) -> None:
    rules = kfe("rules", cwd=tmp_path)
    assert rules.returncode == 0
    for name in ("ekfac", "kfac", "adam", "shampoo"):
        assert name in rules.stdout
    schema = json.loads(kfe("schema", cwd=tmp_path).stdout)
    assert "optimizer" in schema["properties"] and "model" in schema["properties"]
    assert "ekfac" in json.dumps(schema)


def test_profile_and_train_profile_write_a_trace_and_phase_table(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", {**TINY, "epochs": 1})
    every = ["--set", "optimizer.basis_every=1", "--set", "optimizer.lambda_every=1"]
    done = kfe("profile", config, "--out", tmp_path / "prof", *every, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for phase in ("kfe/factors", "kfe/eigh", "kfe/lambda", "kfe/project", "kfe/rule"):
        assert phase in done.stdout
    assert list((tmp_path / "prof").glob("*.pt.trace.json*"))
    assert json.loads((tmp_path / "prof" / "phases.json").read_text())

    train = kfe("train", config, "--out", tmp_path / "run", "--profile", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert list((tmp_path / "run" / "profile").glob("*.pt.trace.json*"))
    assert [r["step"] for r in rows(tmp_path / "run")] == [0, 4]  # profiled steps not counted


def test_diagnose_writes_curves_and_refuses_unknown_layers(tmp_path: Path) -> None:
    config = write(tmp_path / "tiny.yaml", {**TINY, "epochs": 1})
    out = tmp_path / "diag"
    done = kfe("diagnose", config, "--layer", "net.1", "--every", "2", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line) for line in (out / "curvature.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 2]
    assert {"kfac", "ekfac"} <= set(samples[0]["errors"])
    assert (out / "curvature.png").read_bytes().startswith(PNG_SIGNATURE)

    bad = kfe("diagnose", config, "--layer", "fc9", "--out", out, cwd=tmp_path)
    assert bad.returncode == 2 and "fc9" in bad.stderr and "net.1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_shipped_main_job_config_validates_and_expands() -> None:
    from kfe.experiment.ablate import expand_grid
    from kfe.experiment.config import read_mapping, validate_experiment

    path = Path(__file__).parents[1] / "configs" / "mnist_autoencoder.yaml"
    raw = read_mapping(path)
    config = validate_experiment(raw)
    assert config.ablate is not None and config.model_section.name == "autoencoder"
    specs = expand_grid(raw, config.ablate)
    assert {s.label for s in specs} == {"sgd", "adam", "kfac", "ekfac"}
    assert len({s.run_id for s in specs}) == len(specs) == 8
