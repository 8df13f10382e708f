"""The training loop of ``kfe train``: epochs of shuffled minibatches, evaluation after
each epoch, metrics as JSONL and TensorBoard scalars, checkpoints that resume exactly.

Run folder::

    RUN_DIR/config.yaml      the validated config
    RUN_DIR/metrics.jsonl    one row per evaluation (epoch 0 = before training)
    RUN_DIR/checkpoint.pt    model + optimizer + config + counters + RNG states
    RUN_DIR/summary.json     written when the run finishes (``kfe ablate`` skips those)
    RUN_DIR/tb/              TensorBoard scalars

*Time* is training wall-clock only: the clock stops during evaluation and checkpoints
(on CUDA it is read after a device synchronisation). *Exact resume*: the data order of
epoch ``e`` comes from a generator seeded with ``(seed, e)``, the Monte Carlo Fisher
generator's state is checkpointed, and checkpoints are written at epoch ends, so a run
resumed from epoch ``e`` continues bit for bit as if it had not stopped.

*Faults lose nothing*: a fresh run refuses a folder that already holds a run (unless
``overwrite``), ``--resume`` refuses a missing or damaged checkpoint before writing
anything, a metrics line cut short by a kill during its append is dropped with a warning,
and every file but the appended metrics is replaced atomically.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from kfe.experiment.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_yaml,
)
from kfe.experiment.config import (
    ConfigError,
    ExperimentConfigBase,
    TorchOptimizerConfig,
    dump_experiment,
    without_location,
)
from kfe.experiment.setup import LOSS_REDUCTION, Experiment, build_experiment
from kfe.registry import Registry

__all__ = ["autocast", "batches", "evaluate", "preflight", "train", "train_step"]

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
"""What :func:`_save` writes and a resume needs, with the types of the values."""


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled example order of an epoch, from ``(seed, epoch)`` alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(exp: Experiment, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's slice of each global minibatch of an epoch (the last partial batch is
    dropped, so every step sees the same number of examples)."""
    data, size = exp.data, exp.config.data.batch_size
    order = epoch_order(len(data.x_train), exp.config.seed, epoch).to(exp.device)
    local = size // exp.world_size
    for start in range(0, len(order) - size + 1, size):
        idx = order[start + exp.rank * local : start + (exp.rank + 1) * local]
        yield data.x_train[idx], data.y_train[idx]


def autocast(exp: Experiment) -> torch.autocast:
    """The forward pass's autocast context: bfloat16 where ``precision`` asks for it."""
    return torch.autocast(
        exp.device.type, dtype=torch.bfloat16, enabled=exp.config.precision == "bfloat16"
    )


def train_step(
    exp: Experiment, x: Tensor, y: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """One optimizer step on a minibatch; returns the detached loss (no host sync)."""
    opt = exp.optimizer
    opt.zero_grad(set_to_none=True)
    with autocast(exp):
        out = exp.model(x)
    out = out.float()
    kfe_opt = exp.kfe
    if kfe_opt is not None and exp.true_fisher:
        kfe_opt.sample_fisher(out, exp.config.loss_kind, generator, LOSS_REDUCTION)
    loss = exp.loss(out, x, y)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(exp: Experiment, x: Tensor, y: Tensor) -> tuple[float, float | None]:
    """Mean loss (and accuracy for classifiers) over ``x``, in eval mode."""
    module, size = exp.module, exp.config.data.eval_batch_size
    classify = exp.config.model_section.task == "classify"  # whatever the loss
    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        with autocast(exp):
            out = module(xb)
        out = out.float()
        total += exp.loss(out, xb, yb).double() * len(xb)
        if classify:
            correct += (out.argmax(-1) == yb).sum()
    module.train(was_training)
    n = max(len(x), 1)
    accuracy = float(correct) / n if classify else None
    return float(total) / n, accuracy


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


def _check_resumable(saved: dict[str, Any], config: ExperimentConfigBase) -> None:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    config: ExperimentConfigBase,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    registry: Registry | None = None,
    experiment: Experiment | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; returns the last metrics row.

    With ``resume``, continue from ``run_dir/checkpoint.pt`` (same config except
    :data:`RESUMABLE_CHANGES`, e.g. more ``epochs``); a missing or damaged checkpoint is a
    :class:`ConfigError` raised before anything is written. Without it, a ``run_dir``
    that already holds a run (:data:`RUN_FILES`) is refused, unless ``overwrite``: then
    that run's files are deleted first. ``extra`` is added to ``summary.json``
    (``kfe ablate`` records the run's grid axes there).
    """
    exp = experiment or build_experiment(config, registry)
    run_dir = Path(run_dir)
    main = exp.is_main
    log = RunLog(run_dir, main, config.tensorboard)
    generator = torch.Generator(device=exp.device).manual_seed(config.seed + 7919 * exp.rank)
    checkpoint_path = run_dir / CHECKPOINT
    last: dict[str, Any] | None
    if resume:
        epoch, step, elapsed = _resume(exp, config, checkpoint_path, generator)
        rows = log.truncate_after(epoch)
        last = rows[-1] if rows else None
    else:
        _claim(exp, run_dir, overwrite)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        epoch, step, elapsed = 0, 0, 0.0
        last = _evaluate_row(exp, epoch, step, elapsed, None)
        log.write(last)
    if main:
        write_yaml(run_dir / "config.yaml", dump_experiment(config))

    show = config.progress and main and sys.stderr.isatty()
    from tqdm import tqdm

    steps_per_epoch = len(exp.data.x_train) // config.data.batch_size
    epochs = tqdm(
        range(epoch + 1, config.epochs + 1),
        desc=config.label,
        disable=not show,
        initial=epoch,
        total=config.epochs,
    )
    for epoch in epochs:
        if config.max_steps is not None and step >= config.max_steps:
            break
        _sync(exp.device)
        start = time.perf_counter()
        batch_losses = []
        for x, y in tqdm(batches(exp, epoch), total=steps_per_epoch, leave=False, disable=not show):
            batch_losses.append(train_step(exp, x, y, generator))
            step += 1
            if config.max_steps is not None and step >= config.max_steps:
                break
        _sync(exp.device)
        elapsed += time.perf_counter() - start
        batch_loss = float(torch.stack(batch_losses).mean()) if batch_losses else None
        last = _evaluate_row(exp, epoch, step, elapsed, batch_loss)
        log.write(last)
        epochs.set_postfix(loss=f"{last['train_loss']:.4g}")
        finished = epoch == config.epochs or (
            config.max_steps is not None and step >= config.max_steps
        )
        if epoch % config.checkpoint_every == 0 or finished:
            _save(exp, checkpoint_path, epoch, step, elapsed, generator)
        if not math.isfinite(last["train_loss"]):
            break
    log.close()
    if main and last is not None:
        write_json(run_dir / SUMMARY, {**summary(config, last), **(extra or {})})
    return last or {}


def _resume(
    exp: Experiment,
    config: ExperimentConfigBase,
    path: Path,
    generator: torch.Generator,
) -> tuple[int, int, float]:
    """Restore model, optimizer and ``generator`` from the checkpoint at ``path``; returns
    its ``(epoch, step, time)``. Reads only: every refusal comes before any write."""
    state = _resumable_state(path, config, exp.device)
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


def _resumable_state(
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
    _check_resumable(state["config"], config)
    return state


def _no_checkpoint(path: Path) -> str:
    """Why there is nothing to resume at ``path``, and how to start fresh instead."""
    run_dir = path.parent
    if not run_dir.is_dir():
        where = f"{run_dir}: no such folder, so no checkpoint to resume from"
    else:
        where = f"{run_dir}: no {path.name} there, so no checkpoint to resume from"
    held = _held_files(run_dir)
    if held:
        return (
            f"{where} (it holds {', '.join(held)} of a run that never checkpointed); to "
            "start fresh, delete the folder or choose another --out, and run without --resume"
        )
    return f"{where}; to start a fresh run there, run without --resume"


def _held_files(run_dir: Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``run_dir``."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _claim(exp: Experiment, run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a fresh run: refuse one that holds a run, or with
    ``overwrite`` delete that run's files. The main rank decides for every rank."""
    held: list[str] = _from_main(exp, lambda: _held_files(run_dir), [])
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


def _from_main(exp: Experiment, decide: Callable[[], T], default: T) -> T:
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
            held = [] if overwrite else _held_files(run_dir)
            return _holds_a_run(run_dir, held) if held else None
        try:
            _resumable_state(run_dir / CHECKPOINT, config, "cpu")
        except ConfigError as exc:
            return str(exc)
        return None

    message = _from_main(exp, refusal, None)
    if message is not None:
        raise ConfigError(message)


def _evaluate_row(
    exp: Experiment, epoch: int, step: int, elapsed: float, batch_loss: float | None
) -> dict[str, Any]:
    data = exp.data
    limit = exp.config.data.eval_train_limit
    train_loss, _ = evaluate(exp, data.x_train[:limit], data.y_train[:limit])
    test_loss, test_accuracy = evaluate(exp, data.x_test, data.y_test)
    return {
        "epoch": epoch,
        "step": step,
        "time": elapsed,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "batch_loss": batch_loss,
    }


def _save(
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


def summary(config: ExperimentConfigBase, last: dict[str, Any]) -> dict[str, Any]:
    """What ``kfe report`` and ``kfe ablate`` read about a finished run."""
    opt = config.optimizer_section
    damping = None if isinstance(opt, TorchOptimizerConfig) else opt.damping
    return {
        "status": "done",
        "label": config.label,
        "lr": opt.lr,
        "damping": damping,
        "seed": config.seed,
        "final": last,
    }
