"""Faults around a ``kfe train`` run folder: resuming what is not there or is damaged, a
metrics file cut short by a kill, and a fresh run into a folder that holds a run. Each
ends with exit code 2 and a message naming the file (no traceback, nothing lost) or,
for a cut-short last metrics line, a warning and a resume that proceeds.

The CLI runs in-process (``kfe.cli.main``) on tiny digits runs; an uncaught exception
fails the test by itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kfe.cli import main
from kfe.experiment.config import load_experiment
from kfe.experiment.run_dir import RunLog
from kfe.experiment.train import train
from tests.tiny import TINY_RUN as TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def finished(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (checkpoint at epoch 1), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    assert main(["train", str(config), "--out", str(out)]) == 0
    return out


def kfe_train(config: Path, out: Path, *args: str) -> int:
    return main(["train", str(config), "--out", str(out), *args])


def copy_run(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def refused(capsys: pytest.CaptureFixture[str], rc: int, *words: str) -> str:
    """Exit code 2 with one message (no traceback) that contains every one of ``words``."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# 1. --resume with no checkpoint


def test_resume_without_a_folder_exits_2_and_creates_nothing(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r_none"
    rc = kfe_train(config, out, "--resume")
    refused(capsys, rc, str(out), "no checkpoint to resume from", "without --resume")
    assert not out.exists()


def test_resume_without_a_checkpoint_names_the_folder_and_writes_nothing(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    (run / "checkpoint.pt").unlink()  # a run killed before its first checkpoint
    before = snapshot(run)
    rc = kfe_train(config, run, "--resume")
    refused(capsys, rc, str(run), "no checkpoint.pt", "metrics.jsonl", "without --resume")
    assert snapshot(run) == before


# 2. --resume from a damaged or foreign checkpoint


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: a safe load must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _hello(path: Path) -> None:
    path.write_text("hello")


def _empty_mapping(path: Path) -> None:
    torch.save({}, path)


def _wrong_types(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, "epoch": "one", "generator": None}, path)


def _other_model(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, "model": {"fc9.weight": torch.zeros(2)}}, path)


def _pickled_code(path: Path) -> None:
    torch.save({"x": _Payload(path.parent / "PWNED")}, path)


DAMAGED = [
    (_truncated, "unreadable checkpoint"),
    (_hello, "unreadable checkpoint"),
    (_empty_mapping, "missing entries 'model', 'optimizer', 'config'"),
    (_wrong_types, "'epoch' is a str; 'generator' is a NoneType"),
    (_other_model, "not a checkpoint of this model"),
    (_pickled_code, "weights_only=True"),
]


@pytest.mark.parametrize(("damage", "reason"), DAMAGED, ids=[d.__name__ for d, _ in DAMAGED])
def test_resume_from_a_damaged_checkpoint_exits_2_naming_it(
    config: Path,
    finished: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Any,
    reason: str,
) -> None:
    run = copy_run(finished, tmp_path)
    damage(run / "checkpoint.pt")
    before = snapshot(run)
    rc = kfe_train(config, run, "--resume", "--set", "epochs=2")
    refused(capsys, rc, str(run / "checkpoint.pt"), reason)
    assert not (run / "PWNED").exists(), "a pickled payload was executed"
    assert snapshot(run) == before  # nothing rewritten: not the metrics, not the config


@pytest.mark.parametrize("damage", [_hello, _pickled_code], ids=["hello", "pickled_code"])
def test_profile_before_a_resume_checks_the_checkpoint_first(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any
) -> None:
    """``--profile --resume`` refuses a damaged checkpoint before profiling (no
    ``profile/`` written); so it does one of another config."""
    run = copy_run(finished, tmp_path)
    damage(run / "checkpoint.pt")
    rc = kfe_train(config, run, "--resume", "--profile")
    refused(capsys, rc, str(run / "checkpoint.pt"))
    assert not (run / "profile").exists() and not (run / "PWNED").exists()
    other = copy_run(finished, tmp_path / "other")
    rc = kfe_train(config, other, "--resume", "--profile", "--set", "optimizer.lr=0.2")
    refused(capsys, rc, "optimizer: differ from the checkpoint's config")
    assert not (other / "profile").exists()


def test_resume_with_the_data_moved_is_the_same_run(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data.data_dir`` says where the files are, not what the run is: ``--resume``
    with another ``--data-dir`` continues (digits needs no folder, any path will do)."""
    run = copy_run(finished, tmp_path)
    rc = kfe_train(config, run, "--resume", "--set", "epochs=2", "--data-dir", str(tmp_path))
    assert rc == 0, capsys.readouterr().err
    assert epochs(run) == [0, 1, 2]


def test_an_out_folder_that_cannot_be_made_is_reported_without_traceback(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = kfe_train(config, Path("/proc/kfe-no-such-folder"))
    err = capsys.readouterr().err
    assert rc == 1 and "/proc/kfe-no-such-folder" in err and "Traceback" not in err


# 3. metrics.jsonl cut short by a kill, or corrupt in the middle


def test_a_cut_short_last_metrics_line_is_dropped_and_the_resume_proceeds(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 8, "ti')  # killed while appending epoch 2's row
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl: line 3 is incomplete"):
        rc = kfe_train(config, run, "--resume", "--set", "epochs=2")
    assert rc == 0, capsys.readouterr().err
    assert epochs(run) == [0, 1, 2]


def test_a_corrupt_metrics_line_in_the_middle_exits_2_naming_file_and_line(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    before = snapshot(run)
    rc = kfe_train(config, run, "--resume", "--set", "epochs=2")
    refused(capsys, rc, str(run / "metrics.jsonl"), "line 1")
    assert snapshot(run) == before


# 4. a fresh run into a folder that holds a run


@pytest.mark.parametrize(
    "keep", [("checkpoint.pt", "metrics.jsonl", "summary.json"), ("metrics.jsonl",)]
)
def test_a_fresh_run_into_a_folder_holding_a_run_exits_2_and_keeps_it(
    config: Path,
    finished: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep: tuple[str, ...],
) -> None:
    run = copy_run(finished, tmp_path)
    for name in {"checkpoint.pt", "metrics.jsonl", "summary.json"} - set(keep):
        (run / name).unlink()
    before = snapshot(run)
    rc = kfe_train(config, run)
    refused(capsys, rc, str(run), "already holds a run", "--resume", "--out", *keep)
    assert snapshot(run) == before


def test_a_fresh_run_into_an_existing_folder_without_a_run_trains(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / "profile").mkdir(parents=True)  # what `kfe train --profile` writes first
    assert kfe_train(config, out) == 0, capsys.readouterr().err
    assert epochs(out) == [0, 1]


def test_overwrite_flag_starts_the_run_over(
    config: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kfe train --overwrite`` into a folder holding a run trains from scratch there;
    with ``--resume`` it is refused (they contradict each other)."""
    run = copy_run(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 7, "step": 28}\n')  # a row only the old run had
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "events.old").write_text("x")
    assert kfe_train(config, run, "--overwrite") == 0, capsys.readouterr().err
    assert epochs(run) == [0, 1] and not (run / "tb" / "events.old").exists()
    rc = kfe_train(config, run, "--overwrite", "--resume")
    refused(capsys, rc, "--overwrite", "--resume")


def test_train_overwrite_starts_the_run_over(finished: Path, tmp_path: Path) -> None:
    """``train(..., overwrite=True)`` (for callers that restart a run on purpose) deletes
    the old run's files and trains from scratch."""
    run = copy_run(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 7, "step": 28}\n')  # a row only the old run had
    config = load_experiment({**TINY, "epochs": 2})
    last = train(config, run, overwrite=True)
    assert last["epoch"] == 2 and epochs(run) == [0, 1, 2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((run / "summary.json").read_text())["final"]["epoch"] == 2


# 5. the resume's rewrite of metrics.jsonl is atomic


def test_a_fault_while_rewriting_the_metrics_keeps_the_old_file(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(finished, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)  # the rewrite dies before it is in place
    with pytest.raises(OSError, match="disk gone"):
        RunLog(run, enabled=True, tensorboard=False).truncate_after(0)
    assert (run / "metrics.jsonl").read_bytes() == before
    assert not list(run.glob(".metrics.jsonl.*")), "the temporary file was left behind"
