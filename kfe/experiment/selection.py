"""Model selection over the runs of an ablation: configurations, best, envelope, targets.

Definitions (``maximize`` flips every "lower" to "higher"; :func:`higher_is_better` says a
metric whose name contains ``acc`` is maximized, every other one minimized):

- A *configuration* of a label is everything its runs were given except the seed
  (:attr:`RunRecord.config_key`). :func:`group_configs` averages its seeds into a
  :class:`ConfigResult`: the *seed mean* over the non-diverged seeds, at the epochs that
  all of them report, with their min and max, and each seed's value at the last of
  those epochs (``finals``).
- A configuration is *eligible* when no seed diverged and its curve has a point. The
  *best configuration* (:func:`best_config`) is the eligible one with the lowest
  seed-mean final value.
- The *envelope* (:func:`envelope`) is the per-epoch model selection of George et al.
  (2018), EKFAC: ``E(e) = min_c m_c(e)``, the minimum over curves ``c`` of their value
  ``m_c(e)`` at epoch ``e``, chosen independently at every epoch (non-finite values
  ignored, ties to the earlier curve).
- The *time frontier* (:func:`time_frontier`) of ``(time, value)`` points is the
  lower-left frontier: sorted by time, the points that beat every point at an earlier or
  equal time. ``F(T) = min {v : (t, v), t <= T}``, the best value reachable within a
  training-time budget ``T``, is its last value at or before ``T``.
- The *time to target* ``y`` (:func:`time_to_target`) is the least training time ``t``
  at which an eligible configuration's seed mean is ``<= y`` (up to a relative slack of
  ``1e-12``), with its epoch: where the time frontier first crosses ``y``.

:func:`analyse` bundles all of these for one label (:class:`LabelResult`), which the
plots and the summary read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kfe.experiment.runs import CORE_AXES, FloatArray, IntArray, RunRecord, axis_name

__all__ = [
    "ConfigResult",
    "Envelope",
    "LabelResult",
    "TargetHit",
    "analyse",
    "best_config",
    "envelope",
    "fmt_num",
    "group_configs",
    "higher_is_better",
    "num_key",
    "time_frontier",
    "time_to_target",
]


# -- formatting (configuration descriptions, plots, summary.md) --------------------


def fmt_num(value: float | None) -> str:
    """A number as the report writes it: 4 significant digits, ``none`` for None."""
    if value is None:
        return "none"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _fmt_value(value: Any) -> str:
    return fmt_num(float(value)) if isinstance(value, float) else str(value)


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
        parts = [f"lr={fmt_num(self.lr)}"]
        if self.damping is not None:
            parts.append(f"damping={fmt_num(self.damping)}")
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
    other = {k: v for k, v in first.axes.items() if axis_name(k) not in CORE_AXES}
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
                num_key(c.lr),
                num_key(c.damping),
                json.dumps(c.axes, sort_keys=True, default=str),
            )
        )
        result[label] = configs
    return result


def num_key(value: float | None) -> tuple[int, float]:
    return (0, 0.0) if value is None else (1, value)


def higher_is_better(metric: str) -> bool:
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


# -- one label ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LabelResult:
    """Everything the plots and ``summary.md`` show of one label (see :func:`analyse`)."""

    label: str
    configs: list[ConfigResult]
    best: ConfigResult | None
    envelope: Envelope
    frontier: tuple[FloatArray, FloatArray]
    varying: list[str]

    @property
    def eligible(self) -> list[ConfigResult]:
        """The configurations that may be best and take part in the envelope."""
        return [c for c in self.configs if c.eligible]


def analyse(label: str, configs: list[ConfigResult], maximize: bool) -> LabelResult:
    """The best configuration, the envelope and the time frontier of one label's eligible
    configurations, and the axes other than lr and damping whose values vary among them."""
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
    return LabelResult(
        label=label,
        configs=configs,
        best=best_config(configs, maximize),
        envelope=env,
        frontier=time_frontier(points, maximize=maximize),
        varying=varying,
    )
