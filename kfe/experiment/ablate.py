"""``kfe ablate``: run a grid of configs in worker processes and tabulate the results.

The grid is the ``ablate`` section of an experiment config (:class:`AblateConfig`):
for each variant, every combination of the shared axes and the variant's own axes.
Each grid point is a full run in ``OUT/runs/<run_id>/`` (see :mod:`kfe.experiment.train`);
a run whose ``summary.json`` says ``done`` for the same config is skipped on restart, and
one with a checkpoint but no summary is resumed. ``OUT/results.csv`` has one row per run.

Workers are separate processes (``spawn``), each with ``cores // workers`` threads, so
runs neither share the GIL nor fight over cores.
"""

from __future__ import annotations

import csv
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

from kfe.experiment.checkpoint import CHECKPOINT, write_yaml
from kfe.experiment.config import (
    AblateConfig,
    ConfigError,
    ExperimentConfigBase,
    Variant,
    apply_overrides,
    dump_experiment,
    set_path,
    validate_experiment,
)
from kfe.registry import Registry

__all__ = ["RunSpec", "expand_grid", "run_ablation"]

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


def expand_grid(
    base: Mapping[str, Any], ablate: AblateConfig, registry: Registry | None = None
) -> list[RunSpec]:
    """Every run of the ablation, validated (a bad grid point is a :class:`ConfigError`
    naming the run and the field, before anything trains)."""
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


def _is_done(run_dir: Path, config: Mapping[str, Any]) -> bool:
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return False
    import yaml

    def essential(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k != "progress"}

    saved = yaml.safe_load(config_path.read_text())
    status = json.loads(summary_path.read_text()).get("status")
    return status == "done" and essential(saved) == essential(config)


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
            extra={"label": spec.label, "axes": spec.axes, "run_id": spec.run_id},
        )
    except Exception as exc:  # a failed run is recorded, the grid goes on
        from kfe.experiment.checkpoint import write_json

        error = f"{type(exc).__name__}: {exc}"
        write_json(path / "summary.json", {"status": "failed", "error": error})
        return {"status": "failed", "error": error}
    return {"status": "done", **last}


def resolve_workers(workers: int | str, n_runs: int) -> int:
    cores = os.cpu_count() or 1
    wanted = max(1, cores // 2) if workers == "auto" else int(workers)
    return max(1, min(wanted, n_runs))


def run_ablation(
    config: ExperimentConfigBase,
    raw: Mapping[str, Any],
    out_dir: Path,
    *,
    workers: int | None = None,
    registry: Registry | None = None,
) -> list[dict[str, Any]]:
    """Run (or finish) every grid point of ``config.ablate``; returns the results rows."""
    if config.ablate is None:
        raise ConfigError("ablate: the config has no 'ablate' section (grid and/or variants)")
    specs = expand_grid(raw, config.ablate, registry)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(out_dir / "ablation.yaml", dict(raw))
    todo = [s for s in specs if not _is_done(out_dir / "runs" / s.run_id, s.config)]
    n_workers = resolve_workers(workers or config.ablate.workers, max(len(todo), 1))
    threads = max(1, (os.cpu_count() or 1) // n_workers)
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
        summary: dict[str, Any] = (
            json.loads(path.read_text()) if path.is_file() else {"status": "pending"}
        )
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
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(row.get(k)) if k in axes else row.get(k) for k in columns})
