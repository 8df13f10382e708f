"""``kfe ablate``: run a grid of configs in worker processes and tabulate the results.

The grid is the ``ablate`` section of an experiment config (:class:`AblateConfig`):
for each variant, every combination of the shared axes and the variant's own axes.
An axis with no values, or a field that both the shared grid and a variant set (its
``set`` or its own grid), is a :class:`ConfigError` naming the axis and the variant.
Each grid point is a full run in ``OUT/runs/<run_id>/`` (see :mod:`kfe.experiment.run_dir`);
a run whose ``summary.json`` says ``done`` for the same config is skipped on restart, and
one with a checkpoint but no (readable) summary is resumed. ``OUT/results.csv`` has one
row per run; a failed run's ``error`` is the exception's type and message on one line.

Workers are separate processes (``spawn``), each with ``cores // workers`` threads, so
runs neither share the GIL nor fight over cores.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kfe.experiment.checkpoint import CHECKPOINT, atomic_write, write_yaml
from kfe.experiment.config import (
    AblateConfig,
    ConfigError,
    ExperimentConfigBase,
    Variant,
    apply_overrides,
    dump_experiment,
    set_path,
    validate_experiment,
    without_location,
)
from kfe.registry import Registry

__all__ = [
    "RunSpec",
    "check_grid",
    "describe_error",
    "expand_grid",
    "read_summary",
    "run_ablation",
]

RESULT_FIELDS = ("epoch", "step", "time", "train_loss", "test_loss", "test_accuracy")


@dataclass(frozen=True)
class RunSpec:
    """One grid point: its id, its arm's label, the axis values and the full config."""

    run_id: str
    label: str
    axes: dict[str, Any]
    config: dict[str, Any] = field(repr=False)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return str(value.get("name", value.get("type", "x")))
    return str(value)


def _run_id(variant: str | None, axes: Mapping[str, Any]) -> str:
    leaves = [k.rsplit(".", 1)[-1] for k in axes]
    parts = [variant] if variant else []
    for key, leaf in zip(axes, leaves, strict=True):
        name = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{name}={_format(axes[key])}")
    return re.sub(r"[^A-Za-z0-9_.=@+-]", "_", "-".join(parts) or "run")


def _leaf_paths(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths that a ``set`` mapping assigns (nested mappings flattened)."""
    paths: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            paths.extend(_leaf_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


def _replaces(later: str, earlier: str) -> bool:
    """Whether setting the dotted path ``later`` overwrites what ``earlier`` set: the same
    field, or a section that holds it (``optimizer`` replaces ``optimizer.lr``)."""
    return earlier == later or earlier.startswith(f"{later}.")


def _check_axes(where: str, grid: Mapping[str, list[Any]]) -> None:
    """Every axis of ``grid`` (named ``where.<axis>``) has at least one value, and no
    axis overwrites an earlier one (see :func:`_check_in_order`)."""
    for path, values in grid.items():
        if not values:
            raise ConfigError(
                f"{where}.{path}: an axis needs at least one value (an empty list means no runs)"
            )
    _check_in_order(where, list(grid))


def _check_in_order(where: str, paths: list[str]) -> None:
    """Paths applied in this order (a ``set``'s flattened paths, a grid's axes) never
    overwrite an earlier one: the same field twice (``optimizer: {lr: ..}`` and
    ``optimizer.lr``), or a section after a field inside it. Refining (a section, then
    a field inside it) is fine."""
    for i, later in enumerate(paths):
        earlier = next((e for e in paths[:i] if _replaces(later, e)), None)
        if earlier is not None:
            raise ConfigError(
                f"{where}.{later}: overwrites {earlier!r}, set before it in the same place; "
                "give each field once"
            )


def _check_variant(index: int, variant: Variant, shared: Mapping[str, list[Any]]) -> None:
    """A variant's axes are not empty, and nothing it sets is also set elsewhere for it
    (a shared axis, its ``set``, its own axes): one of the two would be lost."""
    where = f"ablate.variants[{index}] ({variant.name})"
    _check_axes(f"{where}.grid", variant.grid)
    _check_in_order(f"{where}.set", _leaf_paths(variant.set))
    for path in _leaf_paths(variant.set):
        clash = next((a for a in [*shared, *variant.grid] if _replaces(a, path)), None)
        if clash is not None:
            source = "ablate.grid" if clash in shared else f"{where}.grid"
            raise ConfigError(
                f"{where}.set.{path}: also set by the axis {clash!r} of {source}, which would "
                "override it; set it in one place only"
            )
    for axis in variant.grid:
        clash = next((a for a in shared if _replaces(axis, a)), None)
        if clash is not None:
            raise ConfigError(
                f"{where}.grid.{axis}: also the shared axis {clash!r} of ablate.grid, which "
                "the variant would override; give that axis either in ablate.grid or in the "
                "grid of every variant"
            )


def check_grid(ablate: AblateConfig) -> None:
    """Refuse an empty axis and a field set twice for one variant (a :class:`ConfigError`
    naming the axis and the variant)."""
    _check_axes("ablate.grid", ablate.grid)
    for index, variant in enumerate(ablate.variants):
        _check_variant(index, variant, ablate.grid)


def expand_grid(
    base: Mapping[str, Any], ablate: AblateConfig, registry: Registry | None = None
) -> list[RunSpec]:
    """Every run of the ablation, validated (a bad grid point is a :class:`ConfigError`
    naming the run and the field, before anything trains; so are an empty axis and a
    field that both the shared grid and a variant set, see :func:`check_grid`)."""
    check_grid(ablate)
    base = {k: v for k, v in base.items() if k != "ablate"}
    variants: list[Variant | None] = [*ablate.variants] or [None]
    specs: list[RunSpec] = []
    for variant in variants:
        data = apply_overrides(base, ())
        for path, value in (variant.set if variant else {}).items():
            set_path(data, path, value)
        axes = {**ablate.grid, **(variant.grid if variant else {})}
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values, strict=True))
            run = apply_overrides(data, ())
            for path, value in point.items():
                set_path(run, path, value)
            run_id = _run_id(variant.name if variant else None, point)
            run["name"] = run_id
            try:
                config = validate_experiment(run, registry)
            except ConfigError as exc:
                raise ConfigError(f"ablate run {run_id}: {exc}") from None
            label = variant.name if variant else config.label
            specs.append(RunSpec(run_id, label, point, dump_experiment(config)))
    ids = [s.run_id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"ablate: runs {duplicates} repeat; give variants distinct names")
    return specs


def _warn(message: str) -> None:
    """A warning on stderr, where the progress of the grid goes."""
    print(f"ablate: warning: {message}", file=sys.stderr)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``; ``None`` if there is none, or (with a warning naming the
    file) if it is not a JSON object: such a run counts as not finished."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _warn(f"{path}: unreadable ({exc}); the run counts as not finished")
        return None
    if not isinstance(summary, dict):
        kind = type(summary).__name__
        _warn(f"{path}: a JSON {kind}, not an object; the run counts as not finished")
        return None
    return summary


def _read_config(path: Path) -> Any:
    """A run's ``config.yaml``, or ``None`` (with a warning) if it cannot be read."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        _warn(f"{path}: unreadable ({exc}); the run counts as not finished")
        return None


def _is_done(run_dir: Path, config: Mapping[str, Any]) -> bool:
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return False

    def essential(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in without_location(c).items() if k != "progress"}

    summary = read_summary(summary_path)
    if summary is None or summary.get("status") != "done":
        return False
    saved = _read_config(config_path)
    return isinstance(saved, Mapping) and essential(saved) == essential(config)


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line (a multi-line message joined with ``; ``), then the
    exception it was raised from, if any: what ``results.csv`` records for a failed run."""
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, KeyError) and exc.args:
        message = f"missing key {exc.args[0]!r}"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return f"{text} (from {describe_error(cause)})" if cause is not None else text


def _run_one(spec: RunSpec, run_dir: str, threads: int) -> dict[str, Any]:
    """Worker entry point: train one grid point (resuming a half-finished one)."""
    import torch

    from kfe.experiment.train import train

    torch.set_num_threads(threads)
    path = Path(run_dir)
    config = validate_experiment({**spec.config, "progress": False})
    resume = (path / CHECKPOINT).is_file() and (path / "config.yaml").is_file()
    try:
        last = train(
            config,
            path,
            resume=resume,
            overwrite=not resume,  # a run cut short before its first checkpoint restarts
            extra={"label": spec.label, "axes": spec.axes, "run_id": spec.run_id},
        )
    except Exception as exc:  # a failed run is recorded, the grid goes on
        from kfe.experiment.checkpoint import write_json

        error = describe_error(exc)
        write_json(path / "summary.json", {"status": "failed", "error": error})
        return {"status": "failed", "error": error}
    return {"status": "done", **last}


def run_ablation(
    config: ExperimentConfigBase,
    raw: Mapping[str, Any],
    out_dir: Path,
    *,
    workers: int | None = None,
    registry: Registry | None = None,
) -> list[dict[str, Any]]:
    """Run (or finish) every grid point of ``config.ablate`` with ``workers`` processes
    (default: ``ablate.workers``; ``auto``: one per 2 cores; at most one per run);
    returns the results rows."""
    if config.ablate is None:
        raise ConfigError("ablate: the config has no 'ablate' section (grid and/or variants)")
    specs = expand_grid(raw, config.ablate, registry)
    wanted = config.ablate.workers if workers is None else workers
    if wanted != "auto" and not (type(wanted) is int and wanted >= 1):  # before writing
        raise ConfigError(f"workers: must be a whole number >= 1 or 'auto', not {wanted!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(out_dir / "ablation.yaml", dict(raw))
    todo = [s for s in specs if not _is_done(out_dir / "runs" / s.run_id, s.config)]
    cores = os.cpu_count() or 1
    n_workers = max(1, min(cores // 2 if wanted == "auto" else wanted, len(todo)))
    threads = max(1, cores // n_workers)
    print(
        f"ablate: {len(specs)} runs, {len(specs) - len(todo)} already done, "
        f"{n_workers} worker(s) x {threads} thread(s)",
        file=sys.stderr,
    )
    outcome: dict[str, dict[str, Any]] = {}
    if todo:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            futures = {
                pool.submit(_run_one, s, str(out_dir / "runs" / s.run_id), threads): s for s in todo
            }
            for future in as_completed(futures):
                spec = futures[future]
                outcome[spec.run_id] = result = future.result()
                loss = result.get("train_loss")
                shown = f"train_loss {loss:.4g}" if loss is not None else result.get("error")
                print(f"  {spec.run_id}: {result['status']} ({shown})", file=sys.stderr)
    rows = collect_results(out_dir, specs)
    write_results(out_dir / "results.csv", rows, specs)
    return rows


def collect_results(out_dir: Path, specs: list[RunSpec]) -> list[dict[str, Any]]:
    """One row per run from its ``summary.json`` (missing: ``status`` ``pending``)."""
    rows = []
    for spec in specs:
        path = out_dir / "runs" / spec.run_id / "summary.json"
        summary = read_summary(path) or {"status": "pending"}
        final: dict[str, Any] = summary.get("final") or {}
        rows.append(
            {
                "run_id": spec.run_id,
                "label": spec.label,
                "status": summary.get("status"),
                **spec.axes,
                **{k: final.get(k) for k in RESULT_FIELDS},
                "error": summary.get("error"),
            }
        )
    return rows


def write_results(path: Path, rows: list[dict[str, Any]], specs: list[RunSpec]) -> None:
    axes = list(dict.fromkeys(k for s in specs for k in s.axes))
    columns = ["run_id", "label", "status", *axes, *RESULT_FIELDS, "error"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) if k in axes else row.get(k) for k in columns})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
