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

The work is split by role: :mod:`~kfe.experiment.runs` reads the run directories,
:mod:`~kfe.experiment.selection` groups seeds into configurations and does the model
selection (best configuration, envelope, time frontier, time-to-target),
:mod:`~kfe.experiment.plots` draws the PNGs and :mod:`~kfe.experiment.summary` writes
``summary.md``. This module ties them together and re-exports their public names.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from kfe.experiment.plots import label_colours, plot_best, plot_envelope, plot_sensitivity
from kfe.experiment.runs import (
    ReportError,
    ReportWarning,
    RunRecord,
    find_run_dirs,
    load_run,
    load_runs,
    why_skipped,
)
from kfe.experiment.selection import (
    ConfigResult,
    Envelope,
    TargetHit,
    analyse,
    best_config,
    envelope,
    group_configs,
    higher_is_better,
    time_frontier,
    time_to_target,
)
from kfe.experiment.summary import ReportFiles, summary_markdown

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
    maximize = higher_is_better(metric)
    everything = load_runs(path, include_unfinished=True)
    single = find_run_dirs(path) == [path]
    runs = everything if single else [r for r in everything if r.finished]
    skipped = [] if single else [r for r in everything if not r.finished]
    for run in skipped:
        warnings.warn(f"{run.path}: {why_skipped(run)}; skipped", ReportWarning, stacklevel=2)
    if not runs:
        raise ReportError(f"{path}: no finished run to report ({len(skipped)} unfinished)")
    available = set().union(*(r.metric_names() for r in runs))
    if metric not in available:
        names = ", ".join(sorted(available)) or "none"
        raise ReportError(f"{path}: no run reports the metric {metric!r} (available: {names})")

    grouped = group_configs(runs, metric)
    results = [analyse(label, configs, maximize) for label, configs in grouped.items()]
    colours = label_colours([r.label for r in results])

    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        out_dir=out,
        summary=out / "summary.md",
        loss_vs_epoch=out / "loss_vs_epoch.png",
        loss_vs_time=out / "loss_vs_time.png",
        envelope=out / "envelope.png",
    )
    plot_best(results, colours, metric, log_y, files.loss_vs_epoch, against="epoch")
    plot_best(results, colours, metric, log_y, files.loss_vs_time, against="time")
    plot_envelope(results, colours, metric, log_y, files.envelope)
    used: set[str] = set()
    for result in results:
        lrs = {c.lr for c in result.configs}
        dampings = {c.damping for c in result.configs}
        if len(lrs) < 2 and len(dampings) < 2:
            continue
        name = _file_stem(result.label, used)
        target = out / f"sensitivity_{name}.png"
        plot_sensitivity(result, metric, log_y, maximize, target)
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
        summary_markdown(path, results, skipped, target_list, files, metric, maximize)
    )
    return files


def _check_targets(targets: Sequence[float] | None) -> None:
    """Targets must be finite numbers (a NaN is never reached, an infinity always)."""
    for target in targets or ():
        if not math.isfinite(target):
            raise ReportError(f"targets: {target} is not a finite number")


def _file_stem(label: str, used: set[str]) -> str:
    """A file-name-safe stem for ``label`` (anything but ``[A-Za-z0-9@.+-]`` becomes ``_``),
    made unique among ``used`` with a ``_2``, ``_3``, ... suffix; added to ``used``."""
    stem = re.sub(r"[^A-Za-z0-9@.+-]+", "_", label).strip("_") or "label"
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate
