"""Plots and a markdown summary from finished runs: the library side of ``kfe report``.

:func:`write_report` reads one run directory or a ``kfe ablate`` directory (its
``runs/<run_id>/`` folders) and writes, under ``out_dir`` (default ``path / "report"``)::

    loss_vs_epoch.png        best configuration of each rule, mean over seeds (min-max shaded)
    loss_vs_time.png         the same against cumulative training wall-clock seconds
    envelope.png             per-epoch model selection: min over configurations at each epoch,
                             and the lower-left (time, metric) frontier
    sensitivity_<label>.png  final metric over the lr x damping grid of each rule
    summary.md               best configurations, final values, time-to-target tables

A *configuration* is everything a run was given except its seed (``lr``, ``damping`` and
any other ablation axis); the seeds of a configuration are averaged. A run whose metrics
hold a NaN or an infinity has *diverged*: it is dropped from every curve, and a
configuration with a diverged seed is never "best" and takes no part in the envelope;
the heatmaps show it as a grey ``div`` cell and ``summary.md`` lists it. A run without
``summary.json`` (unfinished or crashed) inside an ablation is skipped with a
:class:`ReportWarning`; a single run directory given directly is reported from whatever
metrics it has. See ``docs/report.md``.

Nothing here needs a display: figures are drawn on :class:`matplotlib.figure.Figure`
objects, which render with the Agg canvas, and pyplot's global state is never touched.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import yaml
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogFormatter, MaxNLocator

__all__ = [
    "ConfigResult",
    "Envelope",
    "ReportError",
    "ReportFiles",
    "ReportWarning",
    "RunRecord",
    "TargetHit",
    "best_config",
    "envelope",
    "find_run_dirs",
    "group_configs",
    "load_run",
    "load_runs",
    "time_frontier",
    "time_to_target",
    "write_report",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
_BOOKKEEPING = frozenset({"epoch", "step", "time"})
_DPI = 120


class ReportWarning(UserWarning):
    """A run was skipped or read only in part (unfinished, unreadable lines)."""


class ReportError(ValueError):
    """Nothing to report from what was given (not a folder, no run, no such metric, a
    non-finite target); the message names the path or the value."""


# -- loading -----------------------------------------------------------------------


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
                number = _as_float(value)
                if number is not None and not math.isfinite(number):
                    return True
        return False

    @property
    def config_key(self) -> Hashable:
        """What identifies the configuration: lr, damping and every other axis but the seed."""
        other = {k: v for k, v in self.axes.items() if _axis_name(k) not in _CORE_AXES}
        return (self.lr, self.damping, json.dumps(other, sort_keys=True, default=str))

    def series(self, metric: str) -> tuple[IntArray, FloatArray, FloatArray]:
        """``(epochs, times, values)`` of the rows that report ``metric`` (null skipped).

        Values may be NaN or infinite (a diverged run); times missing from a row are NaN.
        """
        epochs: list[int] = []
        times: list[float] = []
        values: list[float] = []
        for row in self.rows:
            value = _as_float(row.get(metric))
            if value is None:
                continue
            epochs.append(int(row.get("epoch", len(epochs))))
            time = _as_float(row.get("time"))
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


_CORE_AXES = frozenset({"lr", "damping", "seed"})


def _axis_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _as_float(value: Any) -> float | None:
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
    rows.sort(key=lambda r: (_as_float(r.get("epoch")) or 0.0, _as_float(r.get("step")) or 0.0))
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
        lr=_as_float(lr),
        damping=_as_float(damping),
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


def _why_skipped(run: RunRecord) -> str:
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
            warnings.warn(f"{run_dir}: {_why_skipped(run)}; skipped", ReportWarning, stacklevel=2)
            continue
        runs.append(run)
    return runs


# -- aggregation -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConfigResult:
    """The seeds of one configuration of one label, for one metric.

    The curve (``epochs``, ``times``, ``mean``, ``low``, ``high``) averages the
    non-diverged seeds over the epochs that all of them report; ``finals`` holds each
    such seed's value at the last of those epochs (its final value when the seeds ran
    equally long), so ``final_mean == mean[-1]``.
    """

    label: str
    lr: float | None
    damping: float | None
    axes: dict[str, Any]
    runs: tuple[RunRecord, ...]
    n_diverged: int
    epochs: IntArray
    times: FloatArray
    mean: FloatArray
    low: FloatArray
    high: FloatArray
    finals: FloatArray

    @property
    def n_seeds(self) -> int:
        """Runs of this configuration, diverged ones included."""
        return len(self.runs)

    @property
    def diverged(self) -> bool:
        """Whether any seed diverged."""
        return self.n_diverged > 0

    @property
    def eligible(self) -> bool:
        """No seed diverged and the curve has a point: it may be "best" and in the envelope."""
        return not self.diverged and self.epochs.size > 0

    @property
    def final_mean(self) -> float:
        """Mean over the non-diverged seeds of the final metric (NaN if none)."""
        return float(np.mean(self.finals)) if self.finals.size else math.nan

    @property
    def final_std(self) -> float:
        """Population std over the non-diverged seeds of the final metric."""
        return float(np.std(self.finals)) if self.finals.size else math.nan

    @property
    def final_time(self) -> float:
        """Mean over the non-diverged seeds of the training time at the last epoch."""
        return float(self.times[-1]) if self.times.size else math.nan

    def describe(self, varying: Iterable[str] = ()) -> str:
        """``lr=0.1, damping=0.001`` plus the other axes named in ``varying``."""
        parts = [f"lr={_fmt_num(self.lr)}"]
        if self.damping is not None:
            parts.append(f"damping={_fmt_num(self.damping)}")
        parts += [f"{k}={_fmt_value(self.axes[k])}" for k in varying if k in self.axes]
        return ", ".join(parts)


def _aggregate(label: str, runs: Sequence[RunRecord], metric: str) -> ConfigResult:
    clean = [r for r in runs if not r.diverged]
    series = [r.series(metric) for r in clean]
    series = [s for s in series if s[0].size]
    empty_i = np.zeros(0, dtype=np.int64)
    empty_f = np.zeros(0, dtype=np.float64)
    epochs, times, mean, low, high, finals = empty_i, empty_f, empty_f, empty_f, empty_f, empty_f
    if series:
        common = set(series[0][0].tolist())
        for s in series[1:]:
            common &= set(s[0].tolist())
        epochs = np.asarray(sorted(common), dtype=np.int64)
        values = np.stack([_at(s[0], s[2], epochs) for s in series])
        stacked_times = np.stack([_at(s[0], s[1], epochs) for s in series])
        if epochs.size:
            times = stacked_times.mean(axis=0)
            mean, low, high = values.mean(axis=0), values.min(axis=0), values.max(axis=0)
            finals = values[:, -1].copy()
    first = runs[0]
    other = {k: v for k, v in first.axes.items() if _axis_name(k) not in _CORE_AXES}
    return ConfigResult(
        label=label,
        lr=first.lr,
        damping=first.damping,
        axes=other,
        runs=tuple(runs),
        n_diverged=len(runs) - len(clean),
        epochs=epochs,
        times=times,
        mean=mean,
        low=low,
        high=high,
        finals=finals,
    )


def _at(epochs: IntArray, values: FloatArray, wanted: IntArray) -> FloatArray:
    """``values`` at the ``wanted`` epochs (the last row wins for a repeated epoch)."""
    lookup = dict(zip(epochs.tolist(), values.tolist(), strict=True))
    return np.asarray([lookup[e] for e in wanted.tolist()], dtype=np.float64)


def group_configs(runs: Iterable[RunRecord], metric: str) -> dict[str, list[ConfigResult]]:
    """Runs grouped by label, then by configuration (all but the seed), seeds averaged.

    Labels are sorted by name; configurations by (lr, damping, other axes).
    """
    by_label: dict[str, dict[Hashable, list[RunRecord]]] = {}
    for run in runs:
        by_label.setdefault(run.label, {}).setdefault(run.config_key, []).append(run)
    result: dict[str, list[ConfigResult]] = {}
    for label in sorted(by_label):
        configs = [_aggregate(label, group, metric) for group in by_label[label].values()]
        configs.sort(
            key=lambda c: (
                _num_key(c.lr),
                _num_key(c.damping),
                json.dumps(c.axes, sort_keys=True, default=str),
            )
        )
        result[label] = configs
    return result


def _num_key(value: float | None) -> tuple[int, float]:
    return (0, 0.0) if value is None else (1, value)


def _maximize(metric: str) -> bool:
    """Accuracies are maximized; every other metric (a loss) is minimized."""
    return "acc" in metric.lower()


def _better(a: float, b: float, maximize: bool) -> bool:
    return a > b if maximize else a < b


def best_config(configs: Sequence[ConfigResult], maximize: bool = False) -> ConfigResult | None:
    """The eligible configuration with the best seed-mean final metric (None if none)."""
    best: ConfigResult | None = None
    for config in configs:
        if not config.eligible or not math.isfinite(config.final_mean):
            continue
        if best is None or _better(config.final_mean, best.final_mean, maximize):
            best = config
    return best


# -- envelopes and targets ---------------------------------------------------------


class Envelope(NamedTuple):
    """Per-epoch best over curves: ``values[i]`` is reached at ``epochs[i]`` by curve
    number ``curve[i]`` (its position in the input)."""

    epochs: IntArray
    values: FloatArray
    curve: IntArray


def envelope(
    curves: Iterable[tuple[Sequence[int] | IntArray, Sequence[float] | FloatArray]],
    *,
    maximize: bool = False,
) -> Envelope:
    """The per-epoch minimum (maximum with ``maximize``) over ``(epochs, values)`` curves.

    This is the paper's model selection: at each epoch, whichever configuration is best
    at that epoch, chosen independently of the other epochs. Epochs are the sorted union over the
    curves; non-finite values are ignored, and an epoch at which no curve is finite is
    left out. Ties go to the earlier curve.
    """
    best: dict[int, tuple[float, int]] = {}
    for number, (epochs, values) in enumerate(curves):
        for epoch, value in zip(
            np.asarray(epochs).tolist(), np.asarray(values).tolist(), strict=True
        ):
            if not math.isfinite(value):
                continue
            current = best.get(int(epoch))
            if current is None or _better(value, current[0], maximize):
                best[int(epoch)] = (float(value), number)
    order = sorted(best)
    return Envelope(
        np.asarray(order, dtype=np.int64),
        np.asarray([best[e][0] for e in order], dtype=np.float64),
        np.asarray([best[e][1] for e in order], dtype=np.int64),
    )


def time_frontier(
    points: Iterable[tuple[float, float]], *, maximize: bool = False
) -> tuple[FloatArray, FloatArray]:
    """The lower-left frontier of ``(time, value)`` points (upper-left with ``maximize``).

    Returns the points, sorted by time, that beat every point at an earlier or equal
    time: the best value reachable within each time budget is the last frontier value at
    or before it. Non-finite points are ignored.
    """
    sign = -1.0 if maximize else 1.0
    # by time, and at equal times the best value first (which the others cannot beat)
    finite = sorted(
        ((float(t), float(v)) for t, v in points if math.isfinite(t) and math.isfinite(v)),
        key=lambda p: (p[0], sign * p[1]),
    )
    times: list[float] = []
    values: list[float] = []
    for t, v in finite:
        if not values or _better(v, values[-1], maximize):
            times.append(t)
            values.append(v)
    return np.asarray(times, dtype=np.float64), np.asarray(values, dtype=np.float64)


class TargetHit(NamedTuple):
    """When a configuration's seed-mean curve first reaches a target."""

    time: float
    epoch: int
    config: ConfigResult


def _reaches(value: float, target: float, maximize: bool) -> bool:
    slack = 1e-12 * max(abs(target), 1e-300)
    return value >= target - slack if maximize else value <= target + slack


def time_to_target(
    configs: Iterable[ConfigResult], target: float, *, maximize: bool = False
) -> TargetHit | None:
    """The least training time at which an eligible configuration's seed-mean metric
    reaches ``target`` (``<=``, or ``>=`` with ``maximize``), with its epoch; None if none.

    This is where the lower-left frontier of :func:`time_frontier` first crosses the
    target. Ties in time go to the earlier epoch.
    """
    hit: TargetHit | None = None
    for config in configs:
        if not config.eligible:
            continue
        for epoch, time, value in zip(
            config.epochs.tolist(), config.times.tolist(), config.mean.tolist(), strict=True
        ):
            if math.isfinite(value) and _reaches(value, target, maximize):
                if hit is None or (time, epoch) < (hit.time, hit.epoch):
                    hit = TargetHit(float(time), int(epoch), config)
                break
    return hit


# -- the report --------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`write_report` wrote."""

    out_dir: Path
    summary: Path
    loss_vs_epoch: Path
    loss_vs_time: Path
    envelope: Path
    sensitivity: dict[str, Path] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Every written file, summary first."""
        fixed = [self.summary, self.loss_vs_epoch, self.loss_vs_time, self.envelope]
        return [*fixed, *self.sensitivity.values()]

    def to_json(self) -> dict[str, Any]:
        """The paths as strings (``sensitivity``: label -> path), for printing as JSON."""
        return {
            "out_dir": str(self.out_dir),
            "summary": str(self.summary),
            "loss_vs_epoch": str(self.loss_vs_epoch),
            "loss_vs_time": str(self.loss_vs_time),
            "envelope": str(self.envelope),
            "sensitivity": {label: str(p) for label, p in self.sensitivity.items()},
        }


@dataclass(frozen=True, eq=False)
class _LabelResult:
    label: str
    configs: list[ConfigResult]
    best: ConfigResult | None
    envelope: Envelope
    frontier: tuple[FloatArray, FloatArray]
    varying: list[str]

    @property
    def eligible(self) -> list[ConfigResult]:
        return [c for c in self.configs if c.eligible]


def _analyse(label: str, configs: list[ConfigResult], maximize: bool) -> _LabelResult:
    eligible = [c for c in configs if c.eligible]
    env = envelope(((c.epochs, c.mean) for c in eligible), maximize=maximize)
    points = [
        (t, v) for c in eligible for t, v in zip(c.times.tolist(), c.mean.tolist(), strict=True)
    ]
    axes_values: dict[str, set[str]] = {}
    for config in configs:
        for key, value in config.axes.items():
            axes_values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    varying = sorted(k for k, v in axes_values.items() if len(v) > 1)
    return _LabelResult(
        label=label,
        configs=configs,
        best=best_config(configs, maximize),
        envelope=env,
        frontier=time_frontier(points, maximize=maximize),
        varying=varying,
    )


def write_report(
    path: Path,
    out_dir: Path | None = None,
    *,
    targets: Sequence[float] | None = None,
    metric: str = "train_loss",
    log_y: bool = True,
) -> ReportFiles:
    """Write the plots and ``summary.md`` for the run or ablation at ``path``.

    ``targets`` are the metric values timed in the time-to-target tables (default: the
    final envelope value of every label, so that each rule is timed against every
    other rule's best final value). ``metric`` is any metrics column (``train_loss``,
    ``test_loss``, ``test_accuracy``, ``batch_loss``); a metric whose name contains
    ``acc`` is maximized, every other one minimized. ``log_y`` puts the metric axes on a
    log scale when every plotted value is positive.

    Raises :class:`FileNotFoundError` / :class:`ReportError` (a :class:`ValueError`
    naming ``path``) when there is no run to report, or no run reports ``metric``, and
    :class:`ReportError` for a target that is not a finite number.
    """
    path = Path(path)
    _check_targets(targets)
    out = Path(out_dir) if out_dir is not None else path / "report"
    maximize = _maximize(metric)
    everything = load_runs(path, include_unfinished=True)
    single = find_run_dirs(path) == [path]
    runs = everything if single else [r for r in everything if r.finished]
    skipped = [] if single else [r for r in everything if not r.finished]
    for run in skipped:
        warnings.warn(f"{run.path}: {_why_skipped(run)}; skipped", ReportWarning, stacklevel=2)
    if not runs:
        raise ReportError(f"{path}: no finished run to report ({len(skipped)} unfinished)")
    available = set().union(*(r.metric_names() for r in runs))
    if metric not in available:
        names = ", ".join(sorted(available)) or "none"
        raise ReportError(f"{path}: no run reports the metric {metric!r} (available: {names})")

    grouped = group_configs(runs, metric)
    results = [_analyse(label, configs, maximize) for label, configs in grouped.items()]
    colours = _colours([r.label for r in results])

    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        out_dir=out,
        summary=out / "summary.md",
        loss_vs_epoch=out / "loss_vs_epoch.png",
        loss_vs_time=out / "loss_vs_time.png",
        envelope=out / "envelope.png",
    )
    _plot_best(results, colours, metric, log_y, files.loss_vs_epoch, against="epoch")
    _plot_best(results, colours, metric, log_y, files.loss_vs_time, against="time")
    _plot_envelope(results, colours, metric, log_y, files.envelope)
    used: set[str] = set()
    for result in results:
        lrs = {c.lr for c in result.configs}
        dampings = {c.damping for c in result.configs}
        if len(lrs) < 2 and len(dampings) < 2:
            continue
        name = _file_stem(result.label, used)
        target = out / f"sensitivity_{name}.png"
        _plot_sensitivity(result, metric, log_y, maximize, target)
        files.sensitivity[result.label] = target

    if targets is None:
        target_list = [
            (float(r.envelope.values[-1]), f"{r.label} final")
            for r in results
            if r.envelope.values.size
        ]
    else:
        target_list = [(float(t), "") for t in targets]
    files.summary.write_text(
        _summary_markdown(path, results, skipped, target_list, files, metric, maximize)
    )
    return files


def _check_targets(targets: Sequence[float] | None) -> None:
    """Targets must be finite numbers (a NaN is never reached, an infinity always)."""
    for target in targets or ():
        if not math.isfinite(target):
            raise ReportError(f"targets: {target} is not a finite number")


# -- plots -------------------------------------------------------------------------


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _file_stem(label: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9@.+-]+", "_", label).strip("_") or "label"
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def _set_log(ax: Axes, values: Iterable[FloatArray], log_y: bool) -> None:
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if log_y and finite and all(bool((v > 0).all()) for v in finite):
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)


class _PlainLogFormatter(LogFormatter):
    """Matplotlib's choice of which log ticks to label, written ``0.6``, not ``6x10^-1``."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        return f"{x:.3g}" if label else ""


def _plain_log_labels(axis: Any) -> None:
    """Plain decimal tick labels on a log axis (minor ones thinned as usual)."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def _no_data(ax: Axes, text: str = "no finite runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig: Figure, target: Path) -> None:
    fig.savefig(target, dpi=_DPI)


def _plot_best(
    results: Sequence[_LabelResult],
    colours: Mapping[str, Any],
    metric: str,
    log_y: bool,
    target: Path,
    *,
    against: str,
) -> None:
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    plotted: list[FloatArray] = []
    for result in results:
        best = result.best
        if best is None:
            continue
        x = best.epochs if against == "epoch" else best.times
        seeds = best.n_seeds
        name = f"{result.label} ({best.describe(result.varying)}"
        name += f"; {seeds} seeds)" if seeds > 1 else ")"
        colour = colours[result.label]
        marker = "o" if best.epochs.size <= 30 else None
        ax.plot(x, best.mean, color=colour, label=name, marker=marker, markersize=3)
        if seeds > 1:
            ax.fill_between(x, best.low, best.high, color=colour, alpha=0.2, linewidth=0)
        plotted += [best.low, best.high]
    _set_log(ax, plotted, log_y)
    if against == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch" if against == "epoch" else "training time (s)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: best configuration per rule (seed mean, min-max shaded)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        _no_data(ax)
    _save(fig, target)


def _plot_envelope(
    results: Sequence[_LabelResult],
    colours: Mapping[str, Any],
    metric: str,
    log_y: bool,
    target: Path,
) -> None:
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    by_epoch, by_time = fig.subplots(1, 2)
    plotted: list[FloatArray] = []
    best_word = "max" if _maximize(metric) else "min"
    for result in results:
        env = result.envelope
        if not env.values.size:
            continue
        colour = colours[result.label]
        n = len(result.eligible)
        name = f"{result.label} ({n} config{'s' if n != 1 else ''})"
        by_epoch.plot(env.epochs, env.values, color=colour, label=name, marker=".")
        times, values = result.frontier
        last_time = max(float(c.times[-1]) for c in result.eligible)
        # a step function: the best value reachable within each time budget
        step_t = np.append(times, max(last_time, float(times[-1])))
        step_v = np.append(values, values[-1])
        by_time.step(step_t, step_v, where="post", color=colour, label=name)
        if times.size <= 30:
            by_time.plot(times, values, linestyle="none", marker=".", color=colour)
        plotted.append(env.values)
    for ax in (by_epoch, by_time):
        _set_log(ax, plotted, log_y)
        ax.set_ylabel(f"{best_word} over configurations of {metric}")
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_epoch.set_xlabel("epoch")
    by_epoch.set_title("per-epoch model selection", fontsize=10)
    by_time.set_xlabel("training time (s)")
    by_time.set_title("frontier of (time, seed-mean metric) over configurations", fontsize=10)
    _save(fig, target)


def _plot_sensitivity(
    result: _LabelResult, metric: str, log_y: bool, maximize: bool, target: Path
) -> None:
    dampings = sorted({c.damping for c in result.configs}, key=_num_key)
    if dampings == [None]:
        _plot_lr_only(result, metric, log_y, target)
        return
    lrs = sorted({c.lr for c in result.configs}, key=_num_key)
    grid = np.full((len(dampings), len(lrs)), np.nan)
    chosen: dict[tuple[int, int], ConfigResult] = {}
    for config in result.configs:
        cell = (dampings.index(config.damping), lrs.index(config.lr))
        current = chosen.get(cell)
        # another axis varies: keep the best configuration of the cell
        if current is None or _cell_rank(config, maximize) < _cell_rank(current, maximize):
            chosen[cell] = config
    for (i, j), config in chosen.items():
        if config.eligible:
            grid[i, j] = config.final_mean
    finite = grid[np.isfinite(grid)]
    use_log = log_y and finite.size > 0 and bool((finite > 0).all())
    norm: Normalize
    if finite.size == 0:
        norm = Normalize(0.0, 1.0)
    elif use_log:
        lo, hi = float(finite.min()), float(finite.max())
        norm = LogNorm(lo, hi if hi > lo else lo * 1.0001)
    else:
        lo, hi = float(finite.min()), float(finite.max())
        norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    cmap = "viridis_r" if maximize else "viridis"
    width = max(4.5, 1.1 * len(lrs) + 2.5)
    height = max(3.2, 0.7 * len(dampings) + 1.8)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("white")
    image = ax.imshow(
        np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto"
    )
    best = result.best
    for (i, j), config in chosen.items():
        if config.eligible:
            value = grid[i, j]
            rgba = image.cmap(image.norm(value))
            light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            colour = "black" if light > 0.5 else "white"
            text = f"{value:.3g}"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
        else:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.6", edgecolor="0.6"))
            ax.text(j, i, _div_text(config), ha="center", va="center", fontsize=9)
        if config is best:
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)
            )
    for i in range(len(dampings)):
        for j in range(len(lrs)):
            if (i, j) not in chosen:
                ax.text(j, i, "no run", ha="center", va="center", color="0.6", fontsize=8)
    ax.set_xticks(range(len(lrs)), [_fmt_num(v) for v in lrs])
    ax.set_yticks(range(len(dampings)), [_fmt_num(v) for v in dampings])
    ax.set_xlabel("lr")
    ax.set_ylabel("damping")
    ax.set_xlim(-0.5, len(lrs) - 0.5)
    ax.set_ylim(-0.5, len(dampings) - 0.5)
    what = "seed mean" if any(c.n_seeds > 1 for c in result.configs) else "final"
    ax.set_title(f"{result.label}: final {metric} ({what}; red = best)", fontsize=10)
    if finite.size:
        bar = fig.colorbar(image, ax=ax, label=f"final {metric}")
        if use_log:
            _plain_log_labels(bar.ax.yaxis)
    _save(fig, target)


def _div_text(config: ConfigResult) -> str:
    """``div`` (every seed diverged), ``div 1/2`` (some did) or ``no data``."""
    if config.n_diverged == config.n_seeds:
        return "div"
    if config.diverged:
        return f"div {config.n_diverged}/{config.n_seeds}"
    return "no data"


def _cell_rank(config: ConfigResult, maximize: bool) -> tuple[int, float]:
    if config.eligible and math.isfinite(config.final_mean):
        return (0, -config.final_mean if maximize else config.final_mean)
    return (1, float(config.n_seeds - config.n_diverged))


def _plot_lr_only(result: _LabelResult, metric: str, log_y: bool, target: Path) -> None:
    lrs = sorted({c.lr for c in result.configs}, key=_num_key)
    fig = Figure(figsize=(max(4.5, 0.9 * len(lrs) + 2.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    xs, ys, errs = [], [], []
    diverged: list[tuple[int, str]] = []
    for j, lr in enumerate(lrs):
        configs = [c for c in result.configs if c.lr == lr]
        good = [c for c in configs if c.eligible and math.isfinite(c.final_mean)]
        if good:
            pick = min(good, key=lambda c: _cell_rank(c, _maximize(metric)))
            xs.append(j)
            ys.append(pick.final_mean)
            errs.append(pick.final_std if pick.n_seeds > 1 else 0.0)
        else:
            diverged.append((j, _div_text(min(configs, key=lambda c: c.n_diverged))))
    if ys:
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color="C0")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                _fmt_num(y),
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        _set_log(ax, [np.asarray(ys)], log_y)
        ax.margins(y=0.15)
    for j, text in diverged:
        ax.axvspan(j - 0.4, j + 0.4, color="0.85")
        ax.text(
            j, 0.5, text, ha="center", va="center", transform=ax.get_xaxis_transform(), fontsize=9
        )
    ax.set_xticks(range(len(lrs)), [_fmt_num(v) for v in lrs])
    ax.set_xlim(-0.5, len(lrs) - 0.5)
    ax.set_xlabel("lr")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{result.label}: final {metric} against lr (no damping)", fontsize=10)
    ax.grid(True, alpha=0.3)
    _save(fig, target)


# -- summary.md --------------------------------------------------------------------


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "none"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _fmt_value(value: Any) -> str:
    return _fmt_num(float(value)) if isinstance(value, float) else str(value)


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.4g} s" if math.isfinite(seconds) else "n/a"


def _fmt_hit(hit: TargetHit | None) -> str:
    return "not reached" if hit is None else f"{_fmt_time(hit.time)} (epoch {hit.epoch})"


def _summary_markdown(
    path: Path,
    results: Sequence[_LabelResult],
    skipped: Sequence[RunRecord],
    targets: Sequence[tuple[float, str]],
    files: ReportFiles,
    metric: str,
    maximize: bool,
) -> str:
    runs = [run for r in results for c in r.configs for run in c.runs]
    diverged = [run for run in runs if run.diverged]
    direction = "higher" if maximize else "lower"
    reach = ">=" if maximize else "<="
    lines = [
        f"# Report: {path.name or path}",
        "",
        f"Source: `{path}`. {len(runs)} runs reported ({len(diverged)} diverged), "
        f"{len(skipped)} unfinished or failed skipped.",
        f"Metric: `{metric}` ({direction} is better). A configuration is every setting but the "
        "seed; its seeds are averaged. The best configuration has the best seed-mean final "
        "value among configurations with no diverged seed; the envelope takes, at each "
        "epoch, the best seed-mean value over those configurations.",
        "",
        "## Overview",
        "",
        f"| rule | best configuration | final {metric} (mean ± std) | seeds | best-ever "
        "(envelope) | training time | diverged runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n_div = sum(c.n_diverged for c in r.configs)
        n_runs = sum(c.n_seeds for c in r.configs)
        best = r.best
        if best is None:
            lines.append(f"| {r.label} | all configurations diverged | | | | | {n_div}/{n_runs} |")
            continue
        lines.append(
            f"| {r.label} | {best.describe(r.varying)} | {_mean_std(best)} | "
            f"{best.finals.size} | {_best_ever(r.envelope, maximize)} | "
            f"{_fmt_time(best.final_time)} | {n_div}/{n_runs} |"
        )

    if targets:
        lines += [
            "",
            "## Time to target",
            "",
            f"Training seconds (and epoch) at which each rule first reaches {metric} {reach} "
            "the target with any of its configurations (seed mean): where its "
            "(time, metric) frontier crosses the target.",
            "",
            "| rule | " + " | ".join(_target_head(t, src, reach) for t, src in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        for r in results:
            cells = [_fmt_hit(time_to_target(r.configs, t, maximize=maximize)) for t, _ in targets]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Plots",
        "",
        "Best configuration per rule against epochs and training time "
        "(seed mean, min-max over seeds shaded):",
        "",
        f"![{metric} vs epoch]({files.loss_vs_epoch.name})",
        "",
        f"![{metric} vs time]({files.loss_vs_time.name})",
        "",
        "Per-epoch model selection (the envelope over configurations) and the (time, metric) "
        "frontier:",
        "",
        f"![envelope]({files.envelope.name})",
    ]
    for r in results:
        lines += ["", f"## {r.label}", ""]
        lines += _label_table(r, targets, metric, maximize, reach)
        if r.label in files.sensitivity:
            name = files.sensitivity[r.label].name
            lines += ["", f"![sensitivity of {r.label}]({name})"]
        elif len(r.configs) > 1:
            lines += ["", "No sensitivity plot: a single lr and damping value."]

    if diverged:
        lines += ["", "## Diverged runs", ""]
        lines += [f"- `{_rel(run.path, path)}` ({run.label}, {_run_desc(run)})" for run in diverged]
    if skipped:
        lines += ["", "## Skipped runs (unfinished or failed)", ""]
        lines += [
            f"- `{_rel(run.path, path)}` ({run.label}, {_run_desc(run)}): {_why_skipped(run)}"
            for run in skipped
        ]
    return "\n".join(lines) + "\n"


def _rel(run_dir: Path, root: Path) -> str:
    """``runs/<id>`` for a run of the reported directory, else the path as given."""
    try:
        return str(run_dir.relative_to(root)) if run_dir != root else str(run_dir)
    except ValueError:
        return str(run_dir)


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _run_desc(run: RunRecord) -> str:
    parts = [f"lr={_fmt_num(run.lr)}"]
    if run.damping is not None:
        parts.append(f"damping={_fmt_num(run.damping)}")
    if run.seed is not None:
        parts.append(f"seed={run.seed}")
    return ", ".join(parts)


def _run_time(run: RunRecord) -> float:
    """The last finite training time a run recorded (0 if none)."""
    times = [_as_float(row.get("time")) for row in run.rows]
    finite = [t for t in times if t is not None and math.isfinite(t)]
    return finite[-1] if finite else 0.0


def _mean_std(config: ConfigResult) -> str:
    if config.finals.size > 1:
        return f"{_fmt_num(config.final_mean)} ± {_fmt_num(config.final_std)}"
    return _fmt_num(config.final_mean)


def _best_ever(env: Envelope, maximize: bool) -> str:
    if not env.values.size:
        return "n/a"
    i = int(np.argmax(env.values) if maximize else np.argmin(env.values))
    return f"{_fmt_num(float(env.values[i]))} (epoch {int(env.epochs[i])})"


def _target_head(target: float, source: str, reach: str) -> str:
    return f"{reach} {_fmt_num(target)}" + (f" ({source})" if source else "")


def _label_table(
    r: _LabelResult,
    targets: Sequence[tuple[float, str]],
    metric: str,
    maximize: bool,
    reach: str,
) -> list[str]:
    n_div = sum(c.n_diverged for c in r.configs)
    n_runs = sum(c.n_seeds for c in r.configs)
    rows = [
        "| | |",
        "|---|---|",
        f"| configurations | {len(r.configs)} ({n_runs} runs, {n_div} diverged) |",
    ]
    best = r.best
    if best is None:
        rows.append("| best configuration | none: every configuration has a diverged seed |")
        return rows
    pick = np.argmax if maximize else np.argmin
    k = int(pick(best.mean))
    total = sum(_run_time(run) for c in r.configs for run in c.runs)
    rows += [
        f"| best configuration | {best.describe(r.varying)} |",
        f"| final {metric} | {_mean_std(best)} ({_seeds(best.finals.size)}) |",
        f"| best-ever, best configuration | {_fmt_num(float(best.mean[k]))} "
        f"(epoch {int(best.epochs[k])}) |",
        f"| best-ever, any configuration | {_best_ever(r.envelope, maximize)} |",
        f"| training time, best configuration | {_fmt_time(best.final_time)} "
        f"(seed mean, {int(best.epochs[-1])} epochs) |",
        f"| training time, all runs | {_fmt_time(total)} |",
    ]
    for target, source in targets:
        hit = time_to_target(r.configs, target, maximize=maximize)
        where = "" if hit is None else f", {hit.config.describe(r.varying)}"
        head = _target_head(target, source, reach)
        rows.append(f"| time to {head} | {_fmt_hit(hit)}{where} |")
    return rows
