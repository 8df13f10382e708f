"""A run folder: claiming it, resuming from it, and what its checkpoint holds.

Run folder::

    RUN_DIR/config.yaml      the validated config
    RUN_DIR/metrics.jsonl    one row per evaluation (epoch 0 = before training)
    RUN_DIR/checkpoint.pt    model + optimizer + config + counters + RNG states
    RUN_DIR/summary.json     written when the run finishes (``kfe ablate`` skips those)
    RUN_DIR/tb/              TensorBoard scalars

*Faults lose nothing*: a fresh run refuses a folder that already holds a run (unless
``overwrite``), ``--resume`` refuses a missing or damaged checkpoint, or one of another
config, before writing anything (:func:`claim`, :func:`restore`, :func:`preflight`), a
metrics line cut short by a kill during its append is dropped with a warning
(:func:`read_metrics`), and every file but the appended metrics is replaced atomically.
Under ``torch.distributed`` the main rank decides for every rank (:func:`from_main`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from kfe.experiment.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from kfe.experiment.config import (
    ConfigError,
    ExperimentConfigBase,
    dump_experiment,
    without_location,
)
from kfe.experiment.setup import Experiment

__all__ = [
    "CHECKPOINT_ENTRIES",
    "METRICS",
    "RESUMABLE_CHANGES",
    "RUN_FILES",
    "SUMMARY",
    "RunLog",
    "claim",
    "from_main",
    "preflight",
    "read_metrics",
    "restore",
    "save",
]

T = TypeVar("T")

RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "progress", "tensorboard", "name"})
"""Config fields that may differ between a checkpoint and the run that resumes it (and
``data.data_dir``, see :func:`kfe.experiment.config.without_location`)."""

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY)
"""The files that make a folder hold a run (a fresh run refuses such a folder)."""

CHECKPOINT_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizer": dict,
    "config": dict,
    "epoch": int,
    "step": int,
    "time": (int, float),
    "generator": list,
}
"""What :func:`save` writes and a resume needs, with the types of the values."""


class RunLog:
    """Metrics rows to JSONL and TensorBoard (main rank only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb_dir = run_dir / "tb" if enabled and tensorboard else None
        self.writer: Any = None  # opened on the first row, so a refused start writes nothing

    def truncate_after(self, epoch: int) -> list[dict[str, Any]]:
        """Keep rows up to ``epoch`` (rows after the checkpoint are replayed on resume);
        the file is replaced atomically, so a crash leaves the old or the new rows."""
        kept = [r for r in read_metrics(self.path) if r["epoch"] <= epoch]
        if self.enabled:
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda f: f.write(text.encode()))
        return kept

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` to the JSONL file (and its scalars to TensorBoard)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb_dir is not None and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and value is not None:
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.add_scalar("time_vs_epoch", row["time"], row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file (none if it does not exist).

    A last line that does not parse is what a kill during its append leaves: it is
    dropped with a warning. A bad line before it is a :class:`ConfigError` naming the
    file and the line number.
    """
    if not path.is_file():
        return []
    lines = enumerate(path.read_text().splitlines(), 1)
    numbered = [(n, line) for n, line in lines if line.strip()]
    rows = []
    for i, (n, line) in enumerate(numbered):
        row = _parse_row(line)
        if row is not None:
            rows.append(row)
        elif i == len(numbered) - 1:
            warnings.warn(
                f"{path}: line {n} is incomplete (a run stopped while writing it); dropped",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            raise ConfigError(f"{path}: line {n} is not a metrics row: {line[:80]!r}")
    return rows


def _parse_row(line: str) -> dict[str, Any] | None:
    """A metrics row (a JSON object with an integer ``epoch``), or ``None``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
        return None
    return row


def check_resumable(saved: dict[str, Any], config: ExperimentConfigBase) -> None:
    """The checkpoint's config equals ``config`` but for :data:`RESUMABLE_CHANGES`."""
    saved, current = without_location(saved), without_location(dump_experiment(config))
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and k != "ablate"
        if saved.get(k) != current.get(k)
    )
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: differ from the checkpoint's config; only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on --resume"
        )


def restore(
    exp: Experiment,
    config: ExperimentConfigBase,
    path: Path,
    generator: torch.Generator,
) -> tuple[int, int, float]:
    """Restore model, optimizer and ``generator`` from the checkpoint at ``path``; returns
    its ``(epoch, step, time)``. Reads only: every refusal comes before any write."""
    state = resumable_state(path, config, exp.device)
    saved = state["generator"]  # one per rank of the saving run
    try:
        exp.module.load_state_dict(state["model"])
        exp.optimizer.load_state_dict(state["optimizer"])
        generator.set_state(saved[min(exp.rank, len(saved) - 1)].cpu())
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: not a checkpoint of this model and optimizer: {type(exc).__name__}: {first}"
        ) from None
    return state["epoch"], state["step"], float(state["time"])


def resumable_state(
    path: Path, config: ExperimentConfigBase, device: str | torch.device
) -> dict[str, Any]:
    """The checkpoint at ``path``, present, readable and of ``config`` (but for
    :data:`RESUMABLE_CHANGES`); else a :class:`CheckpointError`/:class:`ConfigError`."""
    if not path.is_file():
        raise CheckpointError(_no_checkpoint(path))
    try:
        state = load_checkpoint(path, device, required=CHECKPOINT_ENTRIES)
    except CheckpointError as exc:  # kfe ablate retries it on every restart otherwise
        raise CheckpointError(f"{exc}; delete it to start the run over") from None
    check_resumable(state["config"], config)
    return state


def _no_checkpoint(path: Path) -> str:
    """Why there is nothing to resume at ``path``, and how to start fresh instead."""
    run_dir = path.parent
    if not run_dir.is_dir():
        where = f"{run_dir}: no such folder, so no checkpoint to resume from"
    else:
        where = f"{run_dir}: no {path.name} there, so no checkpoint to resume from"
    held = held_files(run_dir)
    if held:
        return (
            f"{where} (it holds {', '.join(held)} of a run that never checkpointed); to "
            "start fresh, delete the folder or choose another --out, and run without --resume"
        )
    return f"{where}; to start a fresh run there, run without --resume"


def held_files(run_dir: Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``run_dir``."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def claim(exp: Experiment, run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a fresh run: refuse one that holds a run, or with
    ``overwrite`` delete that run's files. The main rank decides for every rank."""
    held: list[str] = from_main(exp, lambda: held_files(run_dir), [])
    if not held:
        return
    if not overwrite:
        raise ConfigError(_holds_a_run(run_dir, held))
    if exp.is_main:
        # summary first (ablate would skip a 'done' run), metrics last: a crash in between
        # leaves a run that resumes, or one that restarts, never a mismatched mix; the old
        # TensorBoard events go too, so the new curves are not drawn over the old ones
        for name in (SUMMARY, CHECKPOINT):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
        (run_dir / METRICS).unlink(missing_ok=True)


def _holds_a_run(run_dir: Path, held: list[str]) -> str:
    return (
        f"{run_dir}: already holds a run ({', '.join(held)}); pass --resume to continue "
        "it, --overwrite to start over there (its files are deleted), or another --out"
    )


def from_main(exp: Experiment, decide: Callable[[], T], default: T) -> T:
    """``decide()`` on the main rank, broadcast to every rank (one decision for all,
    even without a shared filesystem)."""
    value = decide() if exp.is_main else default
    if exp.world_size > 1:
        import torch.distributed as dist

        shared: list[Any] = [value]
        dist.broadcast_object_list(shared, src=0)
        value = shared[0]
    return value


def preflight(
    exp: Experiment,
    config: ExperimentConfigBase,
    run_dir: Path,
    resume: bool,
    overwrite: bool = False,
) -> None:
    """The refusals of :func:`train` about ``run_dir``, checked before other work writes
    there (the CLI's ``--profile``): with ``resume`` a checkpoint that is missing,
    damaged or of another config; without it (and without ``overwrite``) a folder that
    holds a run. The main rank decides for all; raises :class:`ConfigError` and writes
    nothing."""
    run_dir = Path(run_dir)

    def refusal() -> str | None:
        if not resume:
            held = [] if overwrite else held_files(run_dir)
            return _holds_a_run(run_dir, held) if held else None
        try:
            resumable_state(run_dir / CHECKPOINT, config, "cpu")
        except ConfigError as exc:
            return str(exc)
        return None

    message = from_main(exp, refusal, None)
    if message is not None:
        raise ConfigError(message)


def save(
    exp: Experiment,
    path: Path,
    epoch: int,
    step: int,
    elapsed: float,
    generator: torch.Generator,
) -> None:
    # every rank's Monte Carlo generator state, gathered so any world size can resume
    states = [generator.get_state()]
    if exp.world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * exp.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if not exp.is_main:
        return
    save_checkpoint(
        path,
        {
            "model": exp.module.state_dict(),
            "optimizer": exp.optimizer.state_dict(),
            "config": dump_experiment(exp.config),
            "epoch": epoch,
            "step": step,
            "time": elapsed,
            "generator": states,
        },
    )
