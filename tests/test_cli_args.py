"""Bad arguments to ``kfe`` end with exit code 2 and a message naming the argument and
what it allows; no traceback, nothing silently ignored.

The CLI runs in-process (``main([...])``); an uncaught exception fails a test by itself.
The few runs that train are tiny (digits, 256 examples, hidden [16], one epoch), and
``kfe ablate``'s worker pool is replaced by threads so that no process is spawned.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kfe.cli import main
from kfe.experiment.config import ConfigError
from kfe.experiment.report import ReportWarning
from tests.tiny import TINY_RUN as TINY

ABLATE: dict[str, Any] = {
    "workers": 1,
    "grid": {"optimizer.lr": [0.1]},
    "variants": [{"name": "e", "grid": {"optimizer.damping": [0.1]}}],
}
RUN_ID = "e-lr=0.1-damping=0.1"  # the one run of ABLATE


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path / "base.yaml", TINY)


def ablation(tmp_path: Path, **changes: Any) -> Path:
    return write(tmp_path / "grid.yaml", {**TINY, "ablate": {**ABLATE, **changes}})


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """Run ``kfe argv``; assert exit code 2 and a message with every one of ``words``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def in_process_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``kfe ablate``'s workers as threads of this process (no spawn: fast); the torch
    thread count the worker sets is restored afterwards."""

    def pool(workers: int, mp_context: Any = None) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(workers)

    monkeypatch.setattr("kfe.experiment.ablate.ProcessPoolExecutor", pool)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fake_run(run_dir: Path, losses: list[float]) -> Path:
    """A finished run folder as ``kfe train`` writes it (no training needed)."""
    run_dir.mkdir(parents=True)
    rows = [
        {"epoch": e, "step": 4 * e, "time": 0.5 * e, "train_loss": v} for e, v in enumerate(losses)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "done", "label": "ekfac", "lr": 0.1, "damping": 0.1, "seed": 0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


# -- kfe report --------------------------------------------------------------------


def test_report_on_a_file_exits_2(capsys: pytest.CaptureFixture[str], base: Path) -> None:
    refused(capsys, ["report", str(base)], "RUN_DIR", "base.yaml", "not a folder")


def test_report_on_an_empty_folder_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    refused(capsys, ["report", str(tmp_path / "empty")], "RUN_DIR", "no runs found")


@pytest.mark.parametrize("lines", ["", '[1, 2]\n"loss"\n'], ids=["empty", "not-objects"])
def test_report_on_metrics_without_rows_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, lines: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(lines)
    with pytest.warns(ReportWarning) as seen:
        refused(capsys, ["report", str(run)], "RUN_DIR", "no run reports the metric 'train_loss'")
    if lines:  # a line that is not an object of metrics is named, not silently dropped
        assert any("metrics.jsonl:1: a JSON list" in str(w.message) for w in seen)


@pytest.mark.parametrize("target", ["nan", "inf", "-inf"])
def test_report_refuses_a_non_finite_target(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str
) -> None:
    run = fake_run(tmp_path / "run", [2.0, 1.0])
    refused(capsys, ["report", str(run), f"--target={target}"], "--target", "finite")
    assert not (run / "report").exists()


def test_report_prints_its_files_as_one_json_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = fake_run(tmp_path / "run", [2.0, 1.0])
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out), "--target=-1", "--target", "1.5"]) == 0
    files = json.loads(capsys.readouterr().out)  # a negative finite target is allowed
    assert files["out_dir"] == str(out) and files["sensitivity"] == {}
    for key in ("summary", "loss_vs_epoch", "loss_vs_time", "envelope"):
        assert Path(files[key]).is_file(), key


# -- --out ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["train"], ["ablate"], ["profile"], ["diagnose", "--layer", "net.1"], ["report"]],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("inside", [False, True], ids=["file", "inside-a-file"])
def test_out_that_is_a_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str], inside: bool
) -> None:
    config = ablation(tmp_path)
    target = fake_run(tmp_path / "run", [2.0, 1.0]) if command == ["report"] else config
    taken = tmp_path / "taken"
    taken.write_text("x")
    out = taken / "sub" if inside else taken
    name, *rest = command
    refused(capsys, [name, str(target), *rest, "--out", str(out)], "--out", str(out))
    assert taken.read_text() == "x"


# -- counts below 1 --------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_profile_steps_below_one_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base: Path, steps: str
) -> None:
    out = tmp_path / "prof"
    refused(capsys, ["profile", str(base), f"--steps={steps}", "--out", str(out)], "--steps")
    assert not out.exists()


def test_train_profile_steps_below_one_exit_2_and_write_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base: Path
) -> None:
    out = tmp_path / "run"
    argv = ["train", str(base), "--profile", "--profile-steps=-1", "--out", str(out)]
    refused(capsys, argv, "--profile-steps", ">= 1")
    assert not out.exists()
    # and without --profile it would be ignored: refused too
    refused(capsys, ["train", str(base), "--profile-steps=2", "--out", str(out)], "--profile")
    assert not out.exists()


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_diagnose_steps_below_one_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base: Path, steps: str
) -> None:
    out = tmp_path / "diag"
    argv = ["diagnose", str(base), "--layer", "net.1", f"--steps={steps}", "--out", str(out)]
    refused(capsys, argv, "--steps", ">= 1")
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_ablate_workers_below_one_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, workers: str
) -> None:
    out = tmp_path / "abl"
    argv = ["ablate", str(ablation(tmp_path)), f"--workers={workers}", "--out", str(out)]
    refused(capsys, argv, "--workers", ">= 1")
    assert not out.exists()


# -- kfe ablate: the grid -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"grid": {"seed": []}}, ["ablate.grid.seed", "at least one value"]),
        (
            {"variants": [{"name": "e", "grid": {"optimizer.damping": []}}]},
            ["ablate.variants[0] (e).grid.optimizer.damping", "at least one value"],
        ),
    ],
    ids=["shared", "variant"],
)
def test_ablate_empty_axis_exits_2_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, changes: dict[str, Any], words: list[str]
) -> None:
    out = tmp_path / "abl"
    refused(capsys, ["ablate", str(ablation(tmp_path, **changes)), "--out", str(out)], *words)
    assert not out.exists()


@pytest.mark.parametrize(
    ("variant", "words"),
    [
        ({"grid": {"optimizer.lr": [0.3]}}, ["(e).grid.optimizer.lr", "'optimizer.lr'"]),
        ({"set": {"optimizer.lr": 0.3}}, ["(e).set.optimizer.lr", "'optimizer.lr'"]),
        ({"set": {"optimizer": {"lr": 0.3}}}, ["(e).set.optimizer.lr", "'optimizer.lr'"]),
    ],
    ids=["grid", "set", "nested-set"],
)
def test_ablate_axis_set_by_both_the_grid_and_a_variant_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, variant: dict[str, Any], words: list[str]
) -> None:
    out = tmp_path / "abl"
    config = ablation(tmp_path, variants=[{"name": "e", **variant}])
    refused(capsys, ["ablate", str(config), "--out", str(out)], "ablate.variants[0]", *words)
    assert not out.exists()


def test_ablate_reruns_a_run_with_a_corrupt_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, in_process_pool: None
) -> None:
    config, out = ablation(tmp_path), tmp_path / "abl"
    assert main(["ablate", str(config), "--out", str(out)]) == 0
    summary = out / "runs" / RUN_ID / "summary.json"
    summary.write_text('{"status": "do')  # a torn write
    capsys.readouterr()
    assert main(["ablate", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {summary}: unreadable" in err and "0 already done" in err
    assert json.loads(summary.read_text())["status"] == "done"
    with (out / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"]


def test_ablate_records_the_whole_message_of_a_failed_run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_process_pool: None,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            {}[174812789]
        except KeyError as exc:
            raise ConfigError("checkpoint.pt: damaged\nre-run without it") from exc
        return {}

    monkeypatch.setattr("kfe.experiment.train.train", broken)
    out = tmp_path / "abl"
    assert main(["ablate", str(ablation(tmp_path)), "--out", str(out)]) == 1
    expected = (
        "ConfigError: checkpoint.pt: damaged; re-run without it"
        " (from KeyError: missing key 174812789)"
    )
    assert f"{RUN_ID}: failed ({expected})" in capsys.readouterr().err
    with (out / "results.csv").open() as f:
        assert [r["error"] for r in csv.DictReader(f)] == [expected]


def test_ablate_records_a_corrupt_checkpoint_by_its_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, in_process_pool: None
) -> None:
    run = tmp_path / "abl" / "runs" / RUN_ID
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert main(["ablate", str(ablation(tmp_path)), "--out", str(tmp_path / "abl")]) == 1
    with (tmp_path / "abl" / "results.csv").open() as f:
        (error,) = [r["error"] for r in csv.DictReader(f)]
    assert "checkpoint.pt" in error and "\n" not in error, error


def test_ablate_restarts_a_run_cut_short_before_its_first_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, in_process_pool: None
) -> None:
    """A run killed during its first epoch left metrics but no checkpoint: the restart of
    the grid trains it from scratch (a plain ``kfe train`` there is refused instead), and
    the old TensorBoard events go with the old metrics."""
    run = tmp_path / "abl" / "runs" / RUN_ID
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.old").write_text("x")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "step": 0, "train_loss": 9.0}\n')
    assert main(["ablate", str(ablation(tmp_path)), "--out", str(tmp_path / "abl")]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["train_loss"] != 9.0
    assert not (run / "tb" / "events.old").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "done"


def test_train_profile_is_refused_before_it_writes(
    capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path
) -> None:
    """``--profile`` runs after the run-folder checks: a folder that holds a run, or a
    ``--resume`` without a checkpoint, exits 2 with no ``profile/`` written."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "metrics.jsonl").write_text('{"epoch": 0}\n')
    refused(capsys, ["train", str(base), "--out", str(held), "--profile"], "already holds a run")
    assert not (held / "profile").exists()
    empty = tmp_path / "empty"
    argv = ["train", str(base), "--out", str(empty), "--profile", "--resume"]
    refused(capsys, argv, "no checkpoint to resume from")
    assert not empty.exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"grid": {"optimizer.lr": [0.1], "optimizer": [{"rule": "ekfac"}]}},
            "ablate.grid.optimizer",
        ),
        (
            {"variants": [{"name": "e", "set": {"optimizer": {"lr": 0.1}, "optimizer.lr": 0.2}}]},
            "ablate.variants[0] (e).set.optimizer.lr: overwrites 'optimizer.lr'",
        ),
    ],
    ids=["grid-axis-over-an-axis", "set-field-twice"],
)
def test_ablate_field_given_twice_in_one_place_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    out, config = tmp_path / "abl", tmp_path / "grid.yaml"
    # in the order written (a user's file is not sorted)
    config.write_text(yaml.safe_dump({**TINY, "ablate": {**ABLATE, **change}}, sort_keys=False))
    refused(capsys, ["ablate", str(config), "--out", str(out)], words)
    assert not out.exists()


def test_shipped_and_documented_grids_expand() -> None:
    """The README's ablation and the docs' example pass the grid checks, refinements
    included (a shared ``optimizer.rule``, a variant axis inside it)."""
    from kfe.experiment.ablate import expand_grid
    from kfe.experiment.config import read_mapping, validate_experiment

    root = Path(__file__).resolve().parents[1]
    raw = read_mapping(root / "configs" / "mnist_autoencoder.yaml")
    assert len(expand_grid(raw, validate_experiment(raw).ablate)) == 8
    docs = {
        **TINY,
        "ablate": {
            "grid": {"seed": [0, 1]},
            "variants": [
                {
                    "name": "adam",
                    "set": {"optimizer": {"type": "torch", "name": "adam"}},
                    "grid": {"optimizer.lr": [0.001, 0.003]},
                },
                {
                    "name": "ekfac",
                    "set": {"optimizer.rule": "ekfac"},
                    "grid": {"optimizer.lr": [0.1, 0.3], "optimizer.damping": [0.1, 1.0]},
                },
                {
                    "name": "batch",
                    "set": {"optimizer.rule": "ekfac"},
                    "grid": {"optimizer.rule.estimator": ["batch", "ema"]},
                },
            ],
        },
    }
    assert len(expand_grid(docs, validate_experiment(docs).ablate)) == 2 * (2 + 4 + 2)
