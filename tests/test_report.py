"""`kfe report`: loading runs, the envelope, time-to-target, and the written files.

Every number here is built by hand: binary fractions, so seed means are exact and the
summary's formatted values can be compared as strings.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import yaml

from kfe.experiment.report import (
    ReportWarning,
    envelope,
    find_run_dirs,
    group_configs,
    load_runs,
    time_frontier,
    time_to_target,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPREAD = 0.0625  # seed 0 is the mean + SPREAD, seed 1 the mean - SPREAD (after epoch 0)

# label -> (lr, damping) -> (seed-mean train_loss per epoch 0..4, seconds per epoch)
CURVES: dict[str, dict[tuple[float, float], tuple[list[float], float]]] = {
    "ekfac": {
        (0.1, 0.01): ([2.0, 1.5, 1.0, 0.75, 0.5], 1.0),
        (0.1, 0.1): ([2.0, 1.0, 0.75, 0.625, 0.5625], 1.0),
        (1.0, 0.01): ([2.0, 1.75, 1.25, 0.5, 0.375], 2.0),
        (1.0, 0.1): ([2.0, 1.25, 1.125, 1.0, 0.875], 0.5),
    },
    "kfac": {
        (0.1, 0.01): ([2.0, 1.5, 1.25, 1.0, 0.75], 1.0),
        (0.1, 0.1): ([2.0, 1.75, 1.5, 1.25, 1.0], 1.0),
        (1.0, 0.01): ([2.0, 1.0, 0.875, 0.625, 0.625], 0.5),
        (1.0, 0.1): ([2.0, 1.125, 0.75, 0.5625, 0.5], 0.75),
    },
}
# the per-epoch minima over configurations of the seed means above
ENVELOPES = {
    "ekfac": [2.0, 1.0, 0.75, 0.5, 0.375],
    "kfac": [2.0, 1.0, 0.75, 0.5625, 0.5],
}


def _row(epoch: int, time: float, loss: float) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "time": time,
        "train_loss": loss,
        "test_loss": loss + 0.125,
        "test_accuracy": None,
        "batch_loss": None if epoch == 0 else loss,
    }


def write_run(
    run_dir: Path,
    label: str,
    lr: float,
    damping: float | None,
    seed: int,
    rows: list[dict[str, Any]],
    *,
    finished: bool = True,
) -> None:
    """One RUN_DIR as the harness writes it (NaN as json.dumps writes it: ``NaN``)."""
    run_dir.mkdir(parents=True)
    optimizer: dict[str, Any] = {"rule": label, "lr": lr, "damping": damping}
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"name": run_dir.name, "seed": seed, "optimizer": optimizer})
    )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        axes = {"optimizer.lr": lr, "seed": seed}
        if damping is not None:
            axes["optimizer.damping"] = damping
        summary = {
            "status": "done",
            "label": label,
            "lr": lr,
            "damping": damping,
            "seed": seed,
            "axes": axes,
            "final": rows[-1],
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))


def seed_rows(mean: list[float], dt: float, seed: int) -> list[dict[str, Any]]:
    sign = 1.0 if seed == 0 else -1.0
    return [
        _row(e, e * dt + sign * 0.25 * e * dt / 2, m + (sign * SPREAD if e else 0.0))
        for e, m in enumerate(mean)
    ]


def make_ablation(root: Path, *, with_adam: bool = False) -> Path:
    """2 labels x 2 lr x 2 damping x 2 seeds, one NaN run, one unfinished, one failed;
    with ``with_adam`` a label without damping: 2 lr values and one that diverges."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.yaml").write_text("grid: {}\n")
    runs = root / "runs"
    n = 0
    for label, configs in CURVES.items():
        for (lr, damping), (mean, dt) in configs.items():
            for seed in (0, 1):
                write_run(runs / f"{n:03d}", label, lr, damping, seed, seed_rows(mean, dt, seed))
                n += 1
    # diverges at epoch 2; the harness stops there
    nan_rows = [_row(0, 0.0, 2.0), _row(1, 1.0, 5.0), _row(2, 2.0, math.nan)]
    write_run(runs / "nan", "ekfac", 10.0, 0.01, 0, nan_rows)
    # very good but unfinished: must not count
    partial = [_row(0, 0.0, 2.0), _row(1, 0.1, 0.01), _row(2, 0.2, 0.001)]
    write_run(runs / "unfinished", "kfac", 0.1, 0.01, 2, partial, finished=False)
    # what `kfe ablate` writes for a run that crashed
    write_run(runs / "failed", "kfac", 1.0, 0.1, 2, partial[:2], finished=False)
    (runs / "failed" / "summary.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    if with_adam:
        for lr, final in ((0.001, 0.25), (0.01, 0.125)):
            rows = [_row(e, float(e), v) for e, v in enumerate([2.0, 1.0, final])]
            write_run(runs / f"adam-{lr}", "adam (torch)", lr, None, 0, rows)
        rows = [_row(0, 0.0, 2.0), _row(1, 1.0, math.inf)]
        write_run(runs / "adam-div", "adam (torch)", 0.1, None, 0, rows)
    return root


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ablation(tmp_path_factory.mktemp("ablation"), with_adam=True)


@pytest.fixture(scope="module")
def report(ablation: Path) -> tuple[Any, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = write_report(ablation)
    assert any("unfinished" in str(w.message) for w in caught)
    return files, files.summary.read_text()


# -- envelope and frontier, directly ---------------------------------------------


def test_envelope_per_epoch_minimum() -> None:
    curves = [
        ([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]),
        ([0, 1, 2], [5.0, 1.5, math.nan]),
        ([1, 2, 3, 4], [2.5, 2.5, math.inf, 0.5]),
    ]
    env = envelope(curves)
    assert env.epochs.tolist() == [0, 1, 2, 3, 4]
    assert env.values.tolist() == [4.0, 1.5, 2.0, 1.0, 0.5]
    assert env.curve.tolist() == [0, 1, 0, 0, 2]
    high = envelope(curves, maximize=True)
    assert high.values.tolist() == [5.0, 3.0, 2.5, 1.0, 0.5]
    empty = envelope([([0], [math.nan])])
    assert empty.epochs.size == 0 and empty.values.size == 0


def test_time_frontier_is_lower_left() -> None:
    points = [(0.0, 2.0), (1.0, 1.5), (1.0, 1.0), (2.0, 1.2), (3.0, 0.5), (4.0, math.nan)]
    times, values = time_frontier(points)
    assert times.tolist() == [0.0, 1.0, 3.0]
    assert values.tolist() == [2.0, 1.0, 0.5]
    times, values = time_frontier([(0.0, 0.1), (1.0, 0.5), (2.0, 0.4)], maximize=True)
    assert times.tolist() == [0.0, 1.0] and values.tolist() == [0.1, 0.5]


def test_envelope_of_the_synthetic_ablation(ablation: Path) -> None:
    with pytest.warns(ReportWarning) as caught:
        runs = load_runs(ablation)
    messages = sorted(str(w.message).split("/runs/")[1] for w in caught)
    assert messages == [
        "failed: status 'failed' in summary.json; skipped",
        "unfinished: no summary.json (unfinished); skipped",
    ]
    assert len(runs) == 2 * 2 * 2 * 2 + 1 + 3  # the unfinished and failed runs are skipped
    grouped = group_configs(runs, "train_loss")
    assert list(grouped) == ["adam (torch)", "ekfac", "kfac"]
    for label, expected in ENVELOPES.items():
        configs = [c for c in grouped[label] if c.eligible]
        assert len(configs) == 4
        env = envelope((c.epochs, c.mean) for c in configs)
        assert env.epochs.tolist() == [0, 1, 2, 3, 4]
        assert env.values.tolist() == expected
    diverged = [c for c in grouped["ekfac"] if c.diverged]
    assert [(c.lr, c.damping, c.n_seeds) for c in diverged] == [(10.0, 0.01, 1)]


def test_time_to_target_uses_the_time_frontier(ablation: Path) -> None:
    with pytest.warns(ReportWarning):
        grouped = group_configs(load_runs(ablation), "train_loss")
    # ekfac reaches 0.5 first by epoch at epoch 3 (lr=1, 6 s), but lr=0.1 gets there
    # sooner in time: epoch 4 at 1 s per epoch
    hit = time_to_target(grouped["ekfac"], 0.5)
    assert hit is not None
    assert (hit.time, hit.epoch, hit.config.lr, hit.config.damping) == (4.0, 4, 0.1, 0.01)
    assert time_to_target(grouped["kfac"], 0.375) is None
    # the NaN run passes through 5.0 and never counts, even for a loose target
    hit = time_to_target(grouped["ekfac"], 2.0)
    assert hit is not None and (hit.time, hit.epoch) == (0.0, 0)


# -- the written report ------------------------------------------------------------


def test_report_writes_valid_pngs(report: tuple[Any, str], ablation: Path) -> None:
    files, _ = report
    assert files.out_dir == ablation / "report"
    assert sorted(files.sensitivity) == ["adam (torch)", "ekfac", "kfac"]
    assert files.sensitivity["ekfac"].name == "sensitivity_ekfac.png"
    # no damping: a 1-D lr plot, under a file name made safe
    assert files.sensitivity["adam (torch)"].name == "sensitivity_adam_torch.png"
    for path in files.paths()[1:]:
        assert_png(path)
    names = {p.name for p in files.out_dir.iterdir()}
    assert {"loss_vs_epoch.png", "loss_vs_time.png", "envelope.png", "summary.md"} <= names


def test_summary_time_to_target(report: tuple[Any, str]) -> None:
    _, text = report
    # default targets: each label's final envelope value (adam 0.125, ekfac 0.375, kfac 0.5)
    head = "| rule | <= 0.125 (adam (torch) final) | <= 0.375 (ekfac final) | <= 0.5 (kfac final) |"
    assert head in text
    assert "| adam (torch) | 2 s (epoch 2) | 2 s (epoch 2) | 2 s (epoch 2) |" in text
    assert "| ekfac | not reached | 8 s (epoch 4) | 4 s (epoch 4) |" in text
    assert "| kfac | not reached | not reached | 3 s (epoch 4) |" in text


def test_summary_best_configs_and_divergence(report: tuple[Any, str]) -> None:
    _, text = report
    # ekfac best: lr=1, damping=0.01, finals 0.4375 and 0.3125 -> 0.375 +- 0.0625
    assert "| best configuration | lr=1, damping=0.01 |" in text
    assert "| final train_loss | 0.375 ± 0.0625 (2 seeds) |" in text
    assert "| best configuration | lr=1, damping=0.1 |" in text  # kfac
    assert "| best-ever, any configuration | 0.375 (epoch 4) |" in text
    assert "| configurations | 5 (9 runs, 1 diverged) |" in text  # ekfac, with the NaN run
    assert "## Diverged runs" in text and "runs/nan" in text
    assert "## Skipped runs" in text
    assert "- `runs/unfinished` (kfac, lr=0.1, damping=0.01, seed=2): no summary.json" in text
    assert "- `runs/failed` (kfac, lr=1, damping=0.1, seed=2): status 'failed'" in text
    for name in ("loss_vs_epoch.png", "loss_vs_time.png", "envelope.png"):
        assert f"]({name})" in text
    assert "](sensitivity_ekfac.png)" in text
    # the label without damping
    assert "| adam (torch) | lr=0.01 | 0.125 |" in text
    assert "| configurations | 3 (3 runs, 1 diverged) |" in text


# -- inputs ------------------------------------------------------------------------


def test_single_run_dir_and_explicit_targets(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # seed 0 of this curve: losses 2, 1.0625, 0.5625 at 0, 1.6875, 3.375 s
    write_run(run, "ekfac", 0.1, 0.01, 0, seed_rows([2.0, 1.0, 0.5], 1.5, 0))
    assert find_run_dirs(run) == [run]
    files = write_report(run, targets=[1.5, 0.5])
    assert files.out_dir == run / "report"
    assert files.sensitivity == {}
    for path in files.paths()[1:]:
        assert_png(path)
    text = files.summary.read_text()
    assert "| rule | <= 1.5 | <= 0.5 |" in text
    assert "| ekfac | 1.688 s (epoch 1) | not reached |" in text
    assert "| training time, best configuration | 3.375 s (seed mean, 2 epochs) |" in text
    # the report folder is not mistaken for a run
    assert find_run_dirs(run) == [run]


def test_unfinished_single_run_is_reported_partially(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, "kfac", 0.1, 0.01, 0, seed_rows([2.0, 1.0], 1.0, 0), finished=False)
    with pytest.warns(ReportWarning, match="partial"):
        files = write_report(run, tmp_path / "out", metric="test_loss", log_y=False)
    assert "| kfac | lr=0.1, damping=0.01 | 1.188 |" in files.summary.read_text()


def test_missing_and_empty_dirs_raise(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        write_report(empty)
    (empty / "runs").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_runs(empty)
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    with pytest.raises(ValueError, match=r"file\.txt"):
        write_report(not_dir)


def test_all_unfinished_or_unknown_metric_raise(tmp_path: Path) -> None:
    root = tmp_path / "abl"
    write_run(
        root / "runs" / "a", "sgd", 0.1, None, 0, seed_rows([2.0, 1.0], 1.0, 0), finished=False
    )
    with pytest.warns(ReportWarning), pytest.raises(ValueError, match="no finished run"):
        write_report(root)
    run = tmp_path / "run"
    write_run(run, "sgd", 0.1, None, 0, seed_rows([2.0, 1.0], 1.0, 0))
    with pytest.raises(ValueError, match="test_accuracy"):
        write_report(run, metric="test_accuracy")


def test_all_diverged_does_not_break(tmp_path: Path) -> None:
    root = tmp_path / "abl"
    for seed in (0, 1):
        rows = [_row(0, 0.0, 2.0), _row(1, 1.0, math.nan)]
        write_run(root / "runs" / f"r{seed}", "sgd", 1.0, None, seed, rows)
    files = write_report(root)
    text = files.summary.read_text()
    assert "| sgd | all configurations diverged |" in text
    assert_png(files.loss_vs_epoch)  # an empty axes with a note, still a valid PNG
    assert np.isfinite(matplotlib.image.imread(files.envelope)).all()
