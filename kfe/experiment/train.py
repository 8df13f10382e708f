"""The training loop of ``kfe train``: epochs of shuffled minibatches, evaluation after
each epoch, metrics as JSONL and TensorBoard scalars, checkpoints that resume exactly.

The run folder it writes, and the refusals that keep a fault from losing a run, are in
:mod:`kfe.experiment.run_dir`.

*Time* is training wall-clock only: the clock stops during evaluation and checkpoints
(on CUDA it is read after a device synchronisation). *Exact resume*: the data order of
epoch ``e`` comes from a generator seeded with ``(seed, e)``, the Monte Carlo Fisher
generator's state is checkpointed, and checkpoints are written at epoch ends, so a run
resumed from epoch ``e`` continues bit for bit as if it had not stopped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kfe.experiment.checkpoint import CHECKPOINT, write_json, write_yaml
from kfe.experiment.config import ExperimentConfigBase, TorchOptimizerConfig, dump_experiment
from kfe.experiment.run_dir import (
    RESUMABLE_CHANGES,
    RUN_FILES,
    SUMMARY,
    RunLog,
    claim,
    preflight,
    restore,
    save,
)
from kfe.experiment.setup import LOSS_REDUCTION, Experiment, build_experiment
from kfe.registry import Registry

__all__ = [
    "RESUMABLE_CHANGES",
    "RUN_FILES",
    "autocast",
    "batches",
    "evaluate",
    "preflight",
    "train",
    "train_step",
]


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
        epoch, step, elapsed = restore(exp, config, checkpoint_path, generator)
        rows = log.truncate_after(epoch)
        last = rows[-1] if rows else None
    else:
        claim(exp, run_dir, overwrite)
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
            save(exp, checkpoint_path, epoch, step, elapsed, generator)
        if not math.isfinite(last["train_loss"]):
            break
    log.close()
    if main and last is not None:
        write_json(run_dir / SUMMARY, {**summary(config, last), **(extra or {})})
    return last or {}


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
