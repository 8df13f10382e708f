"""``summary.md``: the markdown tables of ``kfe report``, and :class:`ReportFiles`.

:func:`summary_markdown` writes, from the per-label results of
:func:`~kfe.experiment.selection.analyse`:

- an overview, one row a label: best configuration, its final metric (mean ± population
  std over seeds), best-ever envelope value and its epoch, training time, diverged runs;
- a label x target table of time-to-target (training seconds and epoch at which the
  label's time frontier first reaches the target, or ``not reached``);
- the plots, embedded by the file names in :class:`ReportFiles`;
- a table per label (:func:`_label_table`), with the training time of all its runs;
- the diverged runs and the skipped (unfinished or failed) ones.

Numbers are written with 4 significant digits (:func:`~kfe.experiment.selection.fmt_num`),
times as ``<seconds> s`` or ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kfe.experiment.runs import RunRecord, as_float, why_skipped
from kfe.experiment.selection import (
    ConfigResult,
    Envelope,
    LabelResult,
    TargetHit,
    fmt_num,
    time_to_target,
)

__all__ = ["ReportFiles", "summary_markdown"]


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`~kfe.experiment.report.write_report` wrote (``summary.md`` links
    the plots by these names)."""

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


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.4g} s" if math.isfinite(seconds) else "n/a"


def _fmt_hit(hit: TargetHit | None) -> str:
    return "not reached" if hit is None else f"{_fmt_time(hit.time)} (epoch {hit.epoch})"


def summary_markdown(
    path: Path,
    results: Sequence[LabelResult],
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
            f"- `{_rel(run.path, path)}` ({run.label}, {_run_desc(run)}): {why_skipped(run)}"
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
    parts = [f"lr={fmt_num(run.lr)}"]
    if run.damping is not None:
        parts.append(f"damping={fmt_num(run.damping)}")
    if run.seed is not None:
        parts.append(f"seed={run.seed}")
    return ", ".join(parts)


def _run_time(run: RunRecord) -> float:
    """The last finite training time a run recorded (0 if none)."""
    times = [as_float(row.get("time")) for row in run.rows]
    finite = [t for t in times if t is not None and math.isfinite(t)]
    return finite[-1] if finite else 0.0


def _mean_std(config: ConfigResult) -> str:
    if config.finals.size > 1:
        return f"{fmt_num(config.final_mean)} ± {fmt_num(config.final_std)}"
    return fmt_num(config.final_mean)


def _best_ever(env: Envelope, maximize: bool) -> str:
    if not env.values.size:
        return "n/a"
    i = int(np.argmax(env.values) if maximize else np.argmin(env.values))
    return f"{fmt_num(float(env.values[i]))} (epoch {int(env.epochs[i])})"


def _target_head(target: float, source: str, reach: str) -> str:
    return f"{reach} {fmt_num(target)}" + (f" ({source})" if source else "")


def _label_table(
    r: LabelResult,
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
        f"| best-ever, best configuration | {fmt_num(float(best.mean[k]))} "
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
