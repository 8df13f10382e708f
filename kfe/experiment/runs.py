"""Reading training runs from disk: the input side of ``kfe report``.

A *run directory* holds what ``kfe train`` writes::

    config.yaml      the experiment config (where summary.json lacks label, lr, damping, seed)
    metrics.jsonl    one JSON object per evaluation: epoch, step, time, train_loss, ...
    summary.json     written when the run ends: status, label, lr, damping, seed, axes, final

and an ablation directory (``kfe ablate``) holds one per grid point under ``runs/``.
:func:`find_run_dirs` finds them, :func:`load_run` reads one into a :class:`RunRecord`,
:func:`load_runs` reads them all.

A run's *status* is what ``summary.json`` says (``"done"``, ``"diverged"``, or any other
value as written, e.g. ``"failed"``), or ``"unfinished"`` without one; done and diverged
runs are *finished*. A run has *diverged* when any of its metrics is a NaN or an
infinity, or its status is ``"diverged"`` (:attr:`RunRecord.diverged`).
A run's *configuration* is everything it was given except its seed: lr, damping and
every other ablation axis (an axis whose last dotted component is ``seed`` is the seed).

Unreadable files and lines (a ``metrics.jsonl`` torn by a crash) are skipped with a
:class:`ReportWarning`; what cannot be reported at all raises :class:`ReportError`.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

__all__ = [
    "CONFIG_FILE",
    "CORE_AXES",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "FloatArray",
    "IntArray",
    "ReportError",
    "ReportWarning",
    "RunRecord",
    "as_float",
    "axis_name",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "why_skipped",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
_BOOKKEEPING = frozenset({"epoch", "step", "time"})


class ReportWarning(UserWarning):
    """A run was skipped or read only in part (unfinished, unreadable lines)."""


class ReportError(ValueError):
    """Nothing to report from what was given (not a folder, no run, no such metric, a
    non-finite target); the message names the path or the value."""


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One training run as read from its directory.

    ``status`` is ``"done"`` or ``"diverged"`` as ``summary.json`` says, ``"unfinished"``
    without a ``summary.json``, or any other status it holds as written (``"failed"``:
    ``kfe ablate`` records a crashed run so). Only done and diverged runs are
    :attr:`finished`. Diverging is a separate question, answered by :attr:`diverged` from
    the metrics themselves.
    """

    path: Path
    label: str
    lr: float | None
    damping: float | None
    seed: int | None
    axes: dict[str, Any]
    status: str
    rows: tuple[dict[str, Any], ...]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The run directory's name."""
        return self.path.name

    @property
    def finished(self) -> bool:
        """Whether ``summary.json`` marks the run as over (done or diverged)."""
        return self.status in ("done", "diverged")

    @functools.cached_property
    def diverged(self) -> bool:
        """A NaN or infinite metric anywhere in the run (or ``status: diverged``)."""
        if self.status == "diverged":
            return True
        for row in self.rows:
            for key, value in row.items():
                if key in _BOOKKEEPING:
                    continue
                number = as_float(value)
                if number is not None and not math.isfinite(number):
                    return True
        return False

    @property
    def config_key(self) -> Hashable:
        """What identifies the configuration: lr, damping and every other axis but the seed."""
        other = {k: v for k, v in self.axes.items() if axis_name(k) not in CORE_AXES}
        return (self.lr, self.damping, json.dumps(other, sort_keys=True, default=str))

    def series(self, metric: str) -> tuple[IntArray, FloatArray, FloatArray]:
        """``(epochs, times, values)`` of the rows that report ``metric`` (null skipped).

        Values may be NaN or infinite (a diverged run); times missing from a row are NaN.
        """
        epochs: list[int] = []
        times: list[float] = []
        values: list[float] = []
        for row in self.rows:
            value = as_float(row.get(metric))
            if value is None:
                continue
            epochs.append(int(row.get("epoch", len(epochs))))
            time = as_float(row.get("time"))
            times.append(math.nan if time is None else time)
            values.append(value)
        return (
            np.asarray(epochs, dtype=np.int64),
            np.asarray(times, dtype=np.float64),
            np.asarray(values, dtype=np.float64),
        )

    def metric_names(self) -> set[str]:
        """Every metric that some row reports with a value."""
        return {
            k
            for row in self.rows
            for k, v in row.items()
            if k not in _BOOKKEEPING and v is not None
        }


CORE_AXES = frozenset({"lr", "damping", "seed"})


def axis_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def as_float(value: Any) -> float | None:
    """A number from a JSON value; ``None`` for null and anything not numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "Infinity"
        except ValueError:
            return None
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"{path}: unreadable ({exc}); ignored", ReportWarning, stacklevel=3)
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a truncated last line
            warnings.warn(f"{path}:{number}: not JSON; line skipped", ReportWarning, stacklevel=3)
            continue
        if not isinstance(row, dict):
            kind = type(row).__name__
            warnings.warn(
                f"{path}:{number}: a JSON {kind}, not an object of metrics; line skipped",
                ReportWarning,
                stacklevel=3,
            )
            continue
        rows.append(row)
    rows.sort(key=lambda r: (as_float(r.get("epoch")) or 0.0, as_float(r.get("step")) or 0.0))
    return rows


def _label_from_config(config: Mapping[str, Any], fallback: str) -> str:
    """The harness's label (``ekfac``, ``adam@shampoo``, ``adam (torch)``), best effort."""
    opt = config.get("optimizer")
    if not isinstance(opt, Mapping):
        return fallback
    if opt.get("type") == "torch" and isinstance(opt.get("name"), str):
        return f"{opt['name']} (torch)"
    rule = opt.get("rule")
    rule = rule.get("name") if isinstance(rule, Mapping) else rule
    if not isinstance(rule, str):
        return fallback
    basis = opt.get("basis")
    basis = basis.get("name") if isinstance(basis, Mapping) else basis
    return rule if not isinstance(basis, str) or basis == "kfac" else f"{rule}@{basis}"


def load_run(run_dir: Path) -> RunRecord:
    """Read ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` of one run directory.

    Label, lr, damping and seed come from ``summary.json``; for a run without one they are
    guessed from ``config.yaml`` (the run is then ``"unfinished"``).
    """
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            # yaml.safe_load's semantics, with libyaml's speed where it is built
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            loaded = yaml.load(config_path.read_text(), Loader=loader)
        except (OSError, yaml.YAMLError) as exc:
            warnings.warn(f"{config_path}: unreadable ({exc})", ReportWarning, stacklevel=2)
            loaded = None
        if isinstance(loaded, dict):
            config = loaded
    summary = _read_json(run_dir / SUMMARY_FILE) if (run_dir / SUMMARY_FILE).is_file() else None
    summary = summary if isinstance(summary, dict) else None
    rows = _read_metrics(run_dir / METRICS_FILE)
    section = config.get("optimizer")
    opt: dict[str, Any] = section if isinstance(section, dict) else {}
    info: dict[str, Any] = summary or {}
    if summary is None:
        status = "unfinished"
    else:
        raw = str(summary.get("status", "done")).lower()
        status = "diverged" if "diverg" in raw else raw
    # summary.json first (a null damping there means "none"), then the config
    label = str(info.get("label") or _label_from_config(config, run_dir.name))
    lr = info["lr"] if "lr" in info else opt.get("lr")
    damping = info["damping"] if "damping" in info else opt.get("damping")
    seed = info["seed"] if "seed" in info else config.get("seed")
    axes = dict(info.get("axes") or {})
    final = info.get("final")
    if not rows and isinstance(final, dict):
        rows = [final]
    seed_value = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return RunRecord(
        path=run_dir,
        label=label,
        lr=as_float(lr),
        damping=as_float(damping),
        seed=seed_value,
        axes=axes,
        status=status,
        rows=tuple(rows),
        config=config,
    )


def _is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / SUMMARY_FILE).is_file()


def find_run_dirs(path: Path) -> list[Path]:
    """The run directories under ``path``: ``path`` itself if it is a run, else every
    folder of ``path/runs/`` (an ablation), else every child folder that holds a run.

    Raises :class:`FileNotFoundError` for a missing ``path`` and :class:`ReportError`
    (a :class:`ValueError`) when it is not a folder or holds no run.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or ablation directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (give a run or ablation directory)")
    if _is_run_dir(path):
        return [path]
    runs = path / "runs"
    if runs.is_dir():
        found = sorted(d for d in runs.iterdir() if d.is_dir())
    else:
        found = sorted(d for d in path.iterdir() if d.is_dir() and _is_run_dir(d))
    if not found:
        raise ReportError(
            f"{path}: no runs found (expected {METRICS_FILE} / {SUMMARY_FILE} there, "
            f"or run folders under {runs})"
        )
    return found


def why_skipped(run: RunRecord) -> str:
    if run.status == "unfinished":
        return f"no {SUMMARY_FILE} (unfinished)"
    return f"status {run.status!r} in {SUMMARY_FILE}"


def load_runs(path: Path, *, include_unfinished: bool = False) -> list[RunRecord]:
    """Every run under ``path`` (see :func:`find_run_dirs`).

    Unfinished runs (no ``summary.json``) of an ablation are skipped with a
    :class:`ReportWarning` unless ``include_unfinished``; a single run directory is
    always returned, finished or not (with a warning if not). Diverged runs are kept:
    callers decide (see :attr:`RunRecord.diverged`).
    """
    path = Path(path)
    dirs = find_run_dirs(path)
    single = dirs == [path]
    runs: list[RunRecord] = []
    for run_dir in dirs:
        run = load_run(run_dir)
        if single and not run.finished:
            warnings.warn(
                f"{run_dir}: no {SUMMARY_FILE}: reporting its partial metrics",
                ReportWarning,
                stacklevel=2,
            )
        elif not run.finished and not include_unfinished:
            warnings.warn(f"{run_dir}: {why_skipped(run)}; skipped", ReportWarning, stacklevel=2)
            continue
        runs.append(run)
    return runs
