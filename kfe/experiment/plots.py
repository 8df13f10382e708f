"""The figures of ``kfe report``, one function a PNG.

- :func:`plot_best`: ``loss_vs_epoch.png`` / ``loss_vs_time.png``, each label's best
  configuration, seed mean with the min-max over seeds shaded.
- :func:`plot_envelope`: ``envelope.png``, the per-epoch envelope against epochs and the
  (time, metric) frontier against training seconds, as a step function.
- :func:`plot_sensitivity`: ``sensitivity_<label>.png``, a heatmap of the seed-mean
  final metric over the lr x damping grid (categorical axes; grey ``div`` cells for
  configurations with a diverged seed, a red border on the best); for a label without
  damping, :func:`_plot_lr_only` draws the final metric against lr instead.

Each label keeps one colour (:func:`label_colours`) in every figure. A metric axis is
logarithmic only when ``log_y`` is asked for and every plotted value is positive
(:func:`_set_log`), with plain decimal tick labels.

Nothing here needs a display: figures are drawn on :class:`matplotlib.figure.Figure`
objects, which render with the Agg canvas, and pyplot's global state is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogFormatter, MaxNLocator

from kfe.experiment.runs import FloatArray
from kfe.experiment.selection import ConfigResult, LabelResult, fmt_num, higher_is_better, num_key

__all__ = ["label_colours", "plot_best", "plot_envelope", "plot_sensitivity"]

_DPI = 120


def label_colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


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


def plot_best(
    results: Sequence[LabelResult],
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


def plot_envelope(
    results: Sequence[LabelResult],
    colours: Mapping[str, Any],
    metric: str,
    log_y: bool,
    target: Path,
) -> None:
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    by_epoch, by_time = fig.subplots(1, 2)
    plotted: list[FloatArray] = []
    best_word = "max" if higher_is_better(metric) else "min"
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


def plot_sensitivity(
    result: LabelResult, metric: str, log_y: bool, maximize: bool, target: Path
) -> None:
    dampings = sorted({c.damping for c in result.configs}, key=num_key)
    if dampings == [None]:
        _plot_lr_only(result, metric, log_y, target)
        return
    lrs = sorted({c.lr for c in result.configs}, key=num_key)
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
    ax.set_xticks(range(len(lrs)), [fmt_num(v) for v in lrs])
    ax.set_yticks(range(len(dampings)), [fmt_num(v) for v in dampings])
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


def _plot_lr_only(result: LabelResult, metric: str, log_y: bool, target: Path) -> None:
    lrs = sorted({c.lr for c in result.configs}, key=num_key)
    fig = Figure(figsize=(max(4.5, 0.9 * len(lrs) + 2.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    xs, ys, errs = [], [], []
    diverged: list[tuple[int, str]] = []
    for j, lr in enumerate(lrs):
        configs = [c for c in result.configs if c.lr == lr]
        good = [c for c in configs if c.eligible and math.isfinite(c.final_mean)]
        if good:
            pick = min(good, key=lambda c: _cell_rank(c, higher_is_better(metric)))
            xs.append(j)
            ys.append(pick.final_mean)
            errs.append(pick.final_std if pick.n_seeds > 1 else 0.0)
        else:
            diverged.append((j, _div_text(min(configs, key=lambda c: c.n_diverged))))
    if ys:
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color="C0")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                fmt_num(y),
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
    ax.set_xticks(range(len(lrs)), [fmt_num(v) for v in lrs])
    ax.set_xlim(-0.5, len(lrs) - 0.5)
    ax.set_xlabel("lr")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{result.label}: final {metric} against lr (no damping)", fontsize=10)
    ax.grid(True, alpha=0.3)
    _save(fig, target)
