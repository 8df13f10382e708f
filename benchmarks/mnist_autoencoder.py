"""Loss against wall-clock on real MNIST: SGD, Adam, K-FAC, EKFAC and SOAP side by side.

Problem: the deep auto-encoder 784-1000-500-250-30-250-500-1000-784 of Hinton &
Salakhutdinov (2006), the benchmark of Martens (2010), K-FAC and EKFAC (kfe's
``autoencoder`` model with its defaults: sigmoid units, linear code layer, PyTorch
init), trained on the 60000 MNIST training images (offline, :func:`kfe.data.load_dataset`)
with kfe's ``loss_function("bce")``: BCE-with-logits against the input, summed over the
784 pixels, averaged over the batch. Batch 1000, 480 steps (8 epochs).

Optimizers (``--only`` picks a subset), each over a small grid of learning rates (and
damping, for K-FAC/EKFAC; ``--grid NAME=V1,V2``):

- ``sgd``: ``torch.optim.SGD`` with momentum 0.9;
- ``adam``: ``torch.optim.Adam``;
- ``kfac``: ``KFEOptimizer(rule="kfac")``, ``factor_every=10``, ``basis_every=100``;
- ``kfac-ident``: the same with KAISA's start and trust region: factor EMAs started at
  ``factor_init=(1, batch^2)`` (KAISA's identity on kfe's per-example scale),
  ``kl_clip=1000`` and momentum 0.9 (KAISA's settings translated to kfe's scale: see
  docs/benchmarks.md); the setting that takes kfe's K-FAC off the mean-image plateau.
  Factor decay ``IDENT_DECAY_PER_STEP^factor_every`` per fold, 0.8 per 10 steps (KAISA
  decays 0.95 a step, 0.6 per 10; 0.8 was the best of 0.6-0.9 on seed 0 for
  ``ekfac-ident``, confirmed on seeds 1 and 2 and for ``kfac-ident``: thirteenth
  session, docs/benchmarks.md);
- ``ekfac-ema``: rule ``ekfac`` with the running-average Lambda, ``lambda_every=10``;
- ``ekfac-batch``: rule ``{"name": "ekfac", "estimator": "batch"}``, ``lambda_every=1``;
- ``ekfac-ident``: ``ekfac-ema`` with ``kfac-ident``'s start, decay, trust region and
  momentum; ``ekfac`` keeps the identity start's share of K-FAC's model next to Lambda
  (docs/rules.md), so the start acts as it does for ``kfac-ident``;
- ``soap``: ``pytorch_optimizer.SOAP`` with its defaults except ``lr``
  (``precondition_frequency=10``): an outside reference, skipped with a note when
  ``pytorch-optimizer`` is not installed (``pip install --no-deps pytorch-optimizer``);
- ``kfe-soap``: kfe's SOAP, ``KFEOptimizer(rule="adam", basis="shampoo",
  eigensolver="power_qr")`` with ``soap``'s settings (betas 0.95/0.95, decoupled weight
  decay 0.01, factor EMA decay 0.95 updated every step), refreshed every
  ``--soap-frequency`` steps like ``soap`` (``--kfe-set`` overrides any of them).

Fairness. Every grid point of every optimizer starts from the same initial weights
(the experiment's seed; checked exactly, and a checksum is printed and stored)
and sees the same batches in the same order (kfe's ``batches``: a permutation seeded
by ``(seed, epoch)``). Runs are sequential, with ``torch.set_num_threads(--threads)``
(2 by default). *Time* is training wall-clock only: the clock stops while the full
training-set loss is evaluated (every ``--eval-every`` steps, at step 0 and at the end).
A non-finite minibatch or evaluation loss ends the grid point, reported as diverged, as
does a training-set loss above ``--blowup`` (5) times the initial one (it cannot win and
would only waste time).

Report. For each optimizer, its best grid point (lowest final full-training-set loss):
final loss, training time, the time it takes to reach two common target losses (Adam's
and SOAP's final losses, their best grid points) -- linearly interpolated between the
two evaluations that bracket the first crossing -- and its loss at a fixed wall-clock
budget (default: Adam's total training time; the last evaluation at or before it).
Then the two targets of the issue, each printed MET or MISSED with its numbers:

1. ``ekfac`` (either estimator, both reported) reaches Adam's final loss in at most
   0.7x Adam's training time;
2. ``ekfac`` reaches SOAP's final loss in less training time than SOAP takes.

Before training, every optimizer runs a few calibration steps (untimed for the report)
to print an estimate of the total runtime (``--estimate-only`` stops there).

Usage::

    python benchmarks/mnist_autoencoder.py --json out.json --plot plots/  # ~20 min
    python benchmarks/mnist_autoencoder.py --quick                        # seconds
    python benchmarks/mnist_autoencoder.py --only adam,ekfac-ema --grid adam=1e-3,3e-3
    python benchmarks/mnist_autoencoder.py --estimate-only
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kfe
from kfe.data import DatasetNotFound, load_dataset
from kfe.experiment.config import (
    ConfigError,
    ExperimentConfigBase,
    apply_overrides,
    validate_experiment,
)
from kfe.experiment.setup import Experiment, build_experiment, build_optimizer
from kfe.experiment.train import batches, evaluate, train_step

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_busy, git_revision, load_soap

KFE_OPTIMIZERS = ("kfac", "kfac-ident", "ekfac-ema", "ekfac-batch", "ekfac-ident")
OPTIMIZERS = ("sgd", "adam", *KFE_OPTIMIZERS, "soap", "kfe-soap")
EKFAC = ("ekfac-ema", "ekfac-batch", "ekfac-ident")
IDENTITY_START = ("kfac-ident", "ekfac-ident")
IDENT_DECAY_PER_STEP = 0.8**0.1  # the identity-start optimizers' factor decay, 0.8 per 10 steps
# Default grids. A value is ``LR`` or, for the KFE optimizers, ``LR:DAMPING``. Chosen
# from short runs (60-240 steps, mostly on the first 10000 images): every setting
# reaches the mean-image plateau (loss ~206) within ~40 steps; Adam 3e-3 and SOAP 3e-2
# leave it by step ~80 (Adam 1e-3/1e-2, SOAP <= 1e-2, SGD 1e-3..1e-2 and every stable
# K-FAC/EKFAC setting tried do not within 120-240 steps; ``kfac-ident``, KAISA's identity
# start, leaves it by step ~160); K-FAC/EKFAC blow up at small damping (0.1:0.1, 0.3:1,
# 0.01:0.01, 0.003:0.001; ekfac-batch at 0.03:0.1). A point costs 100-300 s on the 2-core
# machine (13 full-set evaluations, ~3 s each, included): the default 10 points took 35
# minutes (2096 s). ``kfac-ident``'s lr and damping are on kfe's per-example scale
# (KAISA's lr 0.1 and damping 1e-3 at batch 1000, see the module docstring).
DEFAULT_GRID: dict[str, tuple[str, ...]] = {
    "sgd": ("1e-2",),
    "adam": ("1e-3", "3e-3"),
    "kfac": ("0.1:10",),
    "kfac-ident": ("1e5:1000",),
    "ekfac-ema": ("0.1:1", "0.03:0.1"),
    "ekfac-batch": ("0.1:10",),
    "ekfac-ident": ("1e5:1000",),
    "soap": ("3e-2",),
    "kfe-soap": ("3e-2",),
}
QUICK_GRID: dict[str, tuple[str, ...]] = {name: grid[:1] for name, grid in DEFAULT_GRID.items()}
DEFAULT_DAMPING = 1.0  # KFE damping of a grid value given as a bare LR
# pytorch-optimizer 4.1.0's SOAP defaults, which ``soap`` runs with and ``kfe-soap`` copies
SOAP_BETAS = (0.95, 0.95)
SOAP_WEIGHT_DECAY = 0.01
TARGET_ADAM_RATIO = 0.7  # target 1: ekfac reaches Adam's loss in <= 0.7x Adam's time
QUICK_TRAIN_LIMIT = 2000
LINE = "-" * 100


# -- settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPoint:
    """One optimizer setting of the grid."""

    optimizer: str
    lr: float
    damping: float | None = None  # KFE optimizers only

    @property
    def key(self) -> str:
        """``name lr=... [damping=...]``: the point's name in tables and the JSON."""
        text = f"{self.optimizer} lr={self.lr:g}"
        return text if self.damping is None else f"{text} damping={self.damping:g}"

    @property
    def short(self) -> str:
        """The setting without the optimizer's name."""
        return self.key.split(" ", 1)[1]


def parse_grid(
    items: Sequence[str], base: dict[str, tuple[str, ...]]
) -> dict[str, list[GridPoint]]:
    """``base`` with every ``NAME=V1,V2,...`` of ``items`` replacing that optimizer's grid.

    A value is ``LR``; for the KFE optimizers also ``LR:DAMPING`` (a bare ``LR`` takes
    damping :data:`DEFAULT_DAMPING`).
    """
    raw = dict(base)
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or name not in OPTIMIZERS or not values.strip():
            raise SystemExit(
                f"--grid {item!r}: expected NAME=V1,V2,... with NAME in {', '.join(OPTIMIZERS)}"
            )
        raw[name] = tuple(v.strip() for v in values.split(",") if v.strip())
    grids: dict[str, list[GridPoint]] = {}
    for name, values in raw.items():
        points = []
        for value in values:
            lr_text, _, damping_text = value.partition(":")
            try:
                lr = float(lr_text)
                damping = float(damping_text) if damping_text else None
            except ValueError:
                raise SystemExit(f"--grid {name}: bad value {value!r}") from None
            if name in KFE_OPTIMIZERS:
                damping = DEFAULT_DAMPING if damping is None else damping
            elif damping is not None:
                raise SystemExit(f"--grid {name}: {value!r}: only KFE optimizers take damping")
            if not (lr > 0 and math.isfinite(lr)) or (damping is not None and damping < 0):
                raise SystemExit(f"--grid {name}: bad value {value!r}")
            points.append(GridPoint(name, lr, damping))
        grids[name] = points
    return grids


def optimizer_section(point: GridPoint, args: argparse.Namespace) -> dict[str, Any]:
    """The experiment config's ``optimizer`` section (SOAP: a placeholder Adam, swapped)."""
    name = point.optimizer
    if name == "sgd":
        return {"type": "torch", "name": "sgd", "lr": point.lr, "momentum": args.sgd_momentum}
    if name in ("adam", "soap"):
        return {"type": "torch", "name": "adam", "lr": point.lr}
    if name == "kfe-soap":  # kfe's SOAP with the settings of pytorch-optimizer's SOAP
        section = {
            "type": "kfe",
            "rule": {"name": "adam", "beta1": SOAP_BETAS[0], "beta2": SOAP_BETAS[1]},
            "basis": "shampoo",
            "eigensolver": "power_qr",
            "lr": point.lr,
            "weight_decay": SOAP_WEIGHT_DECAY,  # decoupled, as SOAP's
            "factor_decay": SOAP_BETAS[1],  # SOAP's shampoo_beta defaults to beta2
            "factor_every": 1,  # SOAP updates its factors every step
            "basis_every": args.soap_frequency,
        }
        return _with_overrides(section, args)
    rule: dict[str, Any] = {"name": "kfac"}
    lambda_every = args.lambda_every
    if name in ("ekfac-ema", "ekfac-ident"):
        rule = {"name": "ekfac", "estimator": "ema"}
    elif name == "ekfac-batch":
        rule = {"name": "ekfac", "estimator": "batch"}
        lambda_every = 1
    section = {
        "type": "kfe",
        "rule": rule,
        "lr": point.lr,
        "damping": point.damping,
        "momentum": args.kfe_momentum,
        "factor_every": args.factor_every,
        "basis_every": args.basis_every,
        "lambda_every": lambda_every,
    }
    if name in IDENTITY_START:  # KAISA's start and trust region on kfe's scale
        section.update(
            factor_init=[1.0, float(args.batch) ** 2],
            factor_decay=IDENT_DECAY_PER_STEP**args.factor_every,
            kl_clip=1000.0,
            momentum=0.9,
        )
    return _with_overrides(section, args)


def _with_overrides(section: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``section`` with ``--kfe-set`` applied (exit with the message on a bad one)."""
    try:
        return apply_overrides(section, args.kfe_set)
    except ConfigError as exc:
        raise SystemExit(f"--kfe-set: {exc}") from None


def soap_settings(point: GridPoint, args: argparse.Namespace) -> dict[str, Any]:
    """pytorch-optimizer's SOAP keyword arguments: its defaults but ``lr`` and the refresh."""
    return {"lr": point.lr, "precondition_frequency": args.soap_frequency}


def experiment_config(
    point: GridPoint, args: argparse.Namespace, dataset: str
) -> ExperimentConfigBase:
    """The validated kfe experiment config of one grid point."""
    data: dict[str, Any] = {
        "name": dataset,
        "batch_size": args.batch,
        "eval_batch_size": args.eval_batch,
        "test_limit": 100,  # the test split is not used
    }
    if args.train_limit:
        data["train_limit"] = args.train_limit
    steps_per_epoch = max(1, (args.train_limit or 60000) // args.batch)
    return validate_experiment(
        {
            "name": f"mnist-autoencoder-{point.optimizer}",
            "seed": args.seed,
            "device": args.device,
            "threads": args.threads,
            "epochs": max(1, math.ceil(args.steps / steps_per_epoch)),
            "max_steps": args.steps,
            "loss": "bce",
            "data": data,
            "model": {
                "name": "autoencoder",
                "width": args.width,
                "activation": args.activation,
                "init": args.init,
            },
            "optimizer": optimizer_section(point, args),
            "progress": False,
            "tensorboard": False,
        }
    )


# -- experiments ---------------------------------------------------------------------


class Builder:
    """Experiments for grid points, all sharing one in-memory copy of the data.

    The first experiment comes from :func:`kfe.experiment.setup.build_experiment`; the
    others reuse its dataset and repeat what that function does after loading the data
    (seed, build the network, build the optimizer), so every network starts from the
    same weights, which :attr:`same_init` records (exact comparison with the first).
    """

    def __init__(self, args: argparse.Namespace, dataset: str, soap: Any) -> None:
        self.args = args
        self.dataset = dataset
        self.soap = soap
        self.template: Experiment | None = None
        self.initial: dict[str, torch.Tensor] = {}
        self.same_init = True

    def build(self, point: GridPoint) -> Experiment:
        config = experiment_config(point, self.args, self.dataset)
        if self.template is None:
            exp = build_experiment(config, distributed=False)
            self.template = exp
            self.initial = {k: v.detach().clone() for k, v in exp.module.state_dict().items()}
        else:
            data, device = self.template.data, self.template.device
            torch.manual_seed(config.seed)
            module = config.model_section.build(data.input_shape, data.num_classes).to(device)
            optimizer = build_optimizer(config, module, None)
            exp = Experiment(config, device, data, module, module, optimizer, self.template.loss)
            state = module.state_dict()
            self.same_init &= state.keys() == self.initial.keys() and all(
                torch.equal(state[k], v) for k, v in self.initial.items()
            )
        if point.optimizer == "soap":
            settings = soap_settings(point, self.args)
            exp = dataclasses.replace(exp, optimizer=self.soap(exp.module.parameters(), **settings))
        return exp


def init_checksum(exp: Experiment) -> float:
    """Sum of every initial parameter (float64): equal for equal initial weights."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in exp.module.parameters()))


class Stopwatch:
    """Accumulated wall-clock of the timed regions (device-synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self._start: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self._sync()
            self.elapsed += time.perf_counter() - self._start
            self._start = None


@dataclass
class Run:
    """One grid point's training: the evaluation curve and how it ended."""

    point: GridPoint
    settings: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # training seconds at each eval
    losses: list[float] = field(default_factory=list)  # full training-set loss
    batch_losses: list[float] = field(default_factory=list)  # every step's minibatch loss
    status: str = "ok"  # ok | diverged | error
    message: str = ""
    stopped_at: int | None = None  # step at which a diverged/failed run stopped
    train_time: float = 0.0
    eval_time: float = 0.0
    init_checksum: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.losses)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.ok else math.nan

    def time_to(self, target: float) -> tuple[float, float] | None:
        """``(time, step)`` at which the curve first reaches ``target``, linearly
        interpolated between the bracketing evaluations; ``None`` if never reached."""
        if not math.isfinite(target):
            return None
        for i, loss in enumerate(self.losses):
            if loss <= target:
                if i == 0:
                    return 0.0, 0.0
                l0, l1 = self.losses[i - 1], loss
                frac = (l0 - target) / (l0 - l1) if l0 > l1 else 1.0
                t = self.times[i - 1] + frac * (self.times[i] - self.times[i - 1])
                s = self.steps[i - 1] + frac * (self.steps[i] - self.steps[i - 1])
                return t, s
        return None

    def loss_at(self, budget: float) -> float:
        """The loss of the last evaluation at or before ``budget`` training seconds."""
        before = [loss for t, loss in zip(self.times, self.losses, strict=True) if t <= budget]
        return before[-1] if before else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.point.optimizer,
            "lr": self.point.lr,
            "damping": self.point.damping,
            "settings": self.settings,
            "status": self.status,
            "message": self.message,
            "stopped_at_step": self.stopped_at,
            "final_loss": finite_or_none(self.final_loss),
            "train_time_s": self.train_time,
            "eval_time_s": self.eval_time,
            "init_checksum": self.init_checksum,
            "curve": [
                {"step": s, "time": t, "loss": loss}
                for s, t, loss in zip(self.steps, self.times, self.losses, strict=True)
            ],
            "batch_losses": [finite_or_none(v) for v in self.batch_losses],
        }


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def settings_of(exp: Experiment, point: GridPoint) -> dict[str, Any]:
    """What the JSON records about a grid point's optimizer."""
    if point.optimizer == "soap":
        group = exp.optimizer.param_groups[0]
        keys = ("lr", "betas", "shampoo_beta", "weight_decay", "precondition_frequency")
        return {"class": "pytorch_optimizer.SOAP", **{k: group.get(k) for k in keys}}
    section = exp.config.optimizer_section
    return section.model_dump(mode="json")


def train_point(exp: Experiment, run: Run, args: argparse.Namespace, log: Log) -> Run:
    """Train one grid point for ``args.steps`` steps, evaluating the full training set."""
    data = exp.data
    watch = Stopwatch(exp.device)

    def record(step: int) -> bool:
        start = time.perf_counter()
        loss, _ = evaluate(exp, data.x_train, data.y_train)
        run.eval_time += time.perf_counter() - start
        if not math.isfinite(loss):
            run.status, run.stopped_at = "diverged", step
            run.message = f"full training-set loss {loss} at step {step}"
            return False
        if run.losses and args.blowup and loss > args.blowup * run.losses[0]:
            run.status, run.stopped_at = "diverged", step
            run.message = (
                f"full training-set loss {loss:.4g} at step {step} is over --blowup "
                f"{args.blowup:g}x the initial {run.losses[0]:.4g}"
            )
            return False
        run.steps.append(step)
        run.times.append(watch.elapsed)
        run.losses.append(loss)
        return True

    if not record(0):
        return run
    step = 0
    try:
        for epoch in range(1, args.steps + 1):
            watch.start()
            for x, y in batches(exp, epoch):
                loss = float(train_step(exp, x, y))
                step += 1
                run.batch_losses.append(loss)
                if not math.isfinite(loss):
                    watch.stop()
                    run.status, run.stopped_at = "diverged", step
                    run.message = f"minibatch loss {loss} at step {step}"
                    return run
                if step % args.eval_every == 0 or step == args.steps:
                    watch.stop()
                    if not record(step) or step >= args.steps:
                        return run
                    log(f"    step {step:4d}  t {watch.elapsed:7.1f}s  loss {run.losses[-1]:.3f}")
                    watch.start()
            watch.stop()
    except (RuntimeError, ValueError) as exc:  # e.g. a failed eigendecomposition
        watch.stop()
        run.status, run.stopped_at = "error", step
        run.message = f"{type(exc).__name__}: {exc}"
    finally:
        watch.stop()
        run.train_time = watch.elapsed
    return run


# -- runtime estimate ----------------------------------------------------------------


def calibrate(
    builder: Builder, point: GridPoint, args: argparse.Namespace, eval_s: float | None
) -> dict[str, float]:
    """Time a few steps of ``point`` to estimate one grid point's total time.

    Step 0 holds the first refresh (KFE: eigendecompositions; SOAP: its initialisation);
    steps ``1..k`` (``k = factor_every``, so one factor update and the Lambda updates of
    a cycle are included; SOAP's refresh at step 10 too with the default cadences) give
    the plain per-step cost. Estimate: ``t0 * refreshes + t_plain * (steps - refreshes)``
    plus the evaluations (one is timed when ``eval_s`` is ``None``).
    """
    exp = builder.build(point)
    k = max(2, min(args.factor_every, args.steps))
    times = []
    it = batches_forever(exp)
    for _ in range(k + 1):
        x, y = next(it)
        start = time.perf_counter()
        train_step(exp, x, y)
        times.append(time.perf_counter() - start)
    if eval_s is None:
        start = time.perf_counter()
        evaluate(exp, exp.data.x_train, exp.data.y_train)
        eval_s = time.perf_counter() - start
    plain = sum(times[1:]) / k
    refreshes = math.ceil(args.steps / args.basis_every) if "soap" not in point.optimizer else 1
    n_evals = args.steps // args.eval_every + 1 + (args.steps % args.eval_every != 0)
    return {
        "first_step_s": times[0],
        "step_s": plain,
        "train_s": times[0] * refreshes + plain * (args.steps - refreshes),
        "one_eval_s": eval_s,
        "eval_s": eval_s * n_evals,
    }


def batches_forever(exp: Experiment) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 1
    while True:
        yield from batches(exp, epoch)
        epoch += 1


# -- report --------------------------------------------------------------------------


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """Per optimizer, the grid point with the lowest final loss (``None`` if all failed)."""
    best: dict[str, Run] = {}
    for run in runs:
        name = run.point.optimizer
        if run.ok and (name not in best or run.final_loss < best[name].final_loss):
            best[name] = run
    return best


def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return format(value, spec) if value is not None and math.isfinite(value) else missing


def fmt_reach(reach: tuple[float, float] | None) -> str:
    return "not reached" if reach is None else f"{reach[0]:.1f} s (step {reach[1]:.0f})"


def summarize(runs: list[Run], optimizers: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Best points, targets, times to targets, losses at the budget and the two checks."""
    best = best_runs(runs)
    adam, soap = best.get("adam"), best.get("soap")
    targets = {
        "adam": adam.final_loss if adam else None,
        "soap": soap.final_loss if soap else None,
    }
    budget = args.budget if args.budget is not None else (adam.train_time if adam else None)
    rows = {}
    for name in optimizers:
        run = best.get(name)
        if run is None:
            rows[name] = None
            continue
        reach = {k: run.time_to(v) if v is not None else None for k, v in targets.items()}
        rows[name] = {
            "grid_point": run.point.key,
            "final_loss": run.final_loss,
            "train_time_s": run.train_time,
            "time_to_target": {
                k: None if r is None else {"time_s": r[0], "step": r[1]} for k, r in reach.items()
            },
            "loss_at_budget": run.loss_at(budget) if budget is not None else None,
        }
    checks = []
    if adam is not None:
        limit = TARGET_ADAM_RATIO * adam.train_time
        checks += target_checks(
            rows, 1, "adam", f"Adam's final loss {targets['adam']:.3f}", adam.train_time,
            limit, lambda t: t <= limit,
            f"limit {TARGET_ADAM_RATIO}x Adam's {adam.train_time:.1f} s = {limit:.1f} s",
        )  # fmt: skip
    if soap is not None:
        checks += target_checks(
            rows, 2, "soap", f"SOAP's final loss {targets['soap']:.3f}", soap.train_time,
            soap.train_time, lambda t: t < soap.train_time,
            f"SOAP takes {soap.train_time:.1f} s",
        )  # fmt: skip
    return {
        "targets": targets,
        "budget_s": budget,
        "best": rows,
        "checks": checks,
    }


def target_checks(
    rows: dict[str, Any],
    target: int,
    key: str,
    what: str,
    reference_s: float,
    limit_s: float,
    met: Callable[[float], bool],
    limit_text: str,
) -> list[dict[str, Any]]:
    """One check per EKFAC variant in ``rows``: its time to the ``key`` target loss."""
    checks = []
    for name in EKFAC:
        row = rows.get(name)
        if row is None:
            continue
        reach = row["time_to_target"][key]
        t = None if reach is None else reach["time_s"]
        checks.append(
            {
                "target": target,
                "optimizer": name,
                "met": t is not None and met(t),
                "time_s": t,
                "limit_s": limit_s,
                "text": (
                    f"{name} "
                    + ("does not reach" if t is None else f"reaches in {t:.1f} s")
                    + f" {what}; {limit_text}"
                    + ("" if t is None else f" (ratio {t / reference_s:.2f}x)")
                ),
            }
        )
    return checks


def print_report(
    runs: list[Run], optimizers: list[str], summary: dict[str, Any], args: argparse.Namespace
) -> None:
    targets, budget = summary["targets"], summary["budget_s"]
    print(f"\n{LINE}\n## Every grid point\n")
    print(
        "| optimizer | setting | status | final loss | train s | ms/step | eval s "
        "| time to Adam's loss | time to SOAP's loss |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        status = run.status if run.ok or run.status != "ok" else "no result"
        if run.stopped_at is not None:
            status += f" at step {run.stopped_at}"
        n_steps = len(run.batch_losses)
        per_step = 1e3 * run.train_time / n_steps if n_steps else math.nan
        reach = {k: run.time_to(v) if v is not None else None for k, v in targets.items()}
        print(
            f"| {run.point.optimizer} | {run.point.short} | {status} "
            f"| {fmt(run.final_loss, '.3f')} | {run.train_time:.1f} | {fmt(per_step, '.0f')} "
            f"| {run.eval_time:.1f} "
            f"| {fmt_reach(reach['adam']) if targets['adam'] is not None else '-'} "
            f"| {fmt_reach(reach['soap']) if targets['soap'] is not None else '-'} |"
        )
    for run in runs:
        if run.message:
            print(f"  {run.point.key}: {run.status}: {run.message}")

    print("\n## Best grid point per optimizer (lowest final full-training-set loss)\n")
    print(
        f"Targets: Adam's final loss {fmt(targets['adam'], '.3f')}, SOAP's final loss "
        f"{fmt(targets['soap'], '.3f')} (best grid points). Times to a target are linearly "
        "interpolated between the two evaluations bracketing the first crossing. Budget: "
        + (
            f"{budget:.1f} s of training ("
            + ("--budget" if args.budget is not None else "Adam's total time")
            + "); loss at the last evaluation at or before it."
            if budget is not None
            else "none (Adam not run and no --budget)."
        )
    )
    print()
    adam_time = summary["best"].get("adam", None)
    adam_time = adam_time["train_time_s"] if adam_time else None
    print(
        "| optimizer | best setting | final loss | train s | x Adam time "
        "| time to Adam's loss | time to SOAP's loss | loss at budget |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in optimizers:
        row = summary["best"].get(name)
        if row is None:
            print(f"| {name} | (every grid point diverged or failed) | - | - | - | - | - | - |")
            continue
        reach = row["time_to_target"]
        ratio = row["train_time_s"] / adam_time if adam_time else None

        def show(r: dict[str, float] | None, target: float | None) -> str:
            if target is None:
                return "-"
            return "not reached" if r is None else f"{r['time_s']:.1f} s (step {r['step']:.0f})"

        print(
            f"| {name} | {row['grid_point'].split(' ', 1)[1]} | {row['final_loss']:.3f} "
            f"| {row['train_time_s']:.1f} | {fmt(ratio)} "
            f"| {show(reach['adam'], targets['adam'])} | {show(reach['soap'], targets['soap'])} "
            f"| {fmt(row['loss_at_budget'], '.3f')} |"
        )

    print("\n## Targets of the issue\n")
    if targets["adam"] is None:
        print("1. n/a: Adam was not run (or every Adam grid point failed).")
    if targets["soap"] is None:
        print("2. n/a: SOAP was not run (not installed, --only, or every grid point failed).")
    for check in summary["checks"]:
        verdict = "MET" if check["met"] else "MISSED"
        print(f"{check['target']}. {verdict}: {check['text']}")
    for target in (1, 2):
        mine = [c for c in summary["checks"] if c["target"] == target]
        if mine:
            verdict = "MET" if any(c["met"] for c in mine) else "MISSED"
            met_by = ", ".join(c["optimizer"] for c in mine if c["met"]) or "neither estimator"
            print(f"   => target {target}: {verdict} ({met_by})")
    if not args.quick and any(r.point.optimizer in EKFAC for r in runs) and not summary["checks"]:
        print("(no check possible: run adam and/or soap too)")


def write_plots(
    runs: list[Run], optimizers: list[str], summary: dict[str, Any], out: Path, title: str
) -> list[Path]:
    """Loss vs training time and vs step, best grid point per optimizer, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best = best_runs(runs)
    targets = summary["targets"]
    paths = []
    for axis, xlabel, filename in (
        ("time", "training wall-clock (s, evaluation excluded)", "loss_vs_time.png"),
        ("step", "step", "loss_vs_step.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for name in optimizers:
            run = best.get(name)
            if run is None:
                continue
            xs = run.times if axis == "time" else run.steps
            ax.plot(xs, run.losses, marker=".", label=f"{name} ({run.point.short})")
        for key, style in (("adam", "--"), ("soap", ":")):
            if targets[key] is not None:
                ax.axhline(
                    targets[key],
                    color="grey",
                    linestyle=style,
                    linewidth=1,
                    label=f"{'Adam' if key == 'adam' else 'SOAP'}'s final loss {targets[key]:.2f}",
                )
        adam = best.get("adam")
        if axis == "time" and adam is not None:
            ax.axvline(
                TARGET_ADAM_RATIO * adam.train_time,
                color="grey",
                linestyle="-.",
                linewidth=1,
                label=f"{TARGET_ADAM_RATIO}x Adam's time",
            )
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("full training-set loss (BCE summed over pixels)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# -- environment ---------------------------------------------------------------------


def environment(soap_version: str) -> dict[str, Any]:
    kfe_path = Path(kfe.__file__).resolve().parent
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "kfe": kfe.__version__,
        "kfe_path": str(kfe_path),
        "kfe_git": git_revision(kfe_path),
        "torch": torch.__version__,
        "pytorch_optimizer": soap_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "cpu_busy_start": cpu_busy(),
    }


Log = Callable[[str], None]


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="grid of one optimizer (repeatable); values LR, or LR:DAMPING for "
        f"{', '.join(KFE_OPTIMIZERS)}. Defaults: "
        + "; ".join(f"{k}={','.join(v)}" for k, v in DEFAULT_GRID.items()),
    )
    p.add_argument("--steps", type=int, help="optimizer steps (480; quick 12)")
    p.add_argument("--batch", type=int, help="batch size (1000; quick 100)")
    p.add_argument("--eval-every", type=int, help="evaluation period in steps (40; quick 4)")
    p.add_argument("--eval-batch", type=int, default=5000, help="evaluation batch size (5000)")
    p.add_argument(
        "--train-limit", type=int, help=f"first N training images (all; quick {QUICK_TRAIN_LIMIT})"
    )
    p.add_argument("--width", type=float, help="autoencoder width multiplier (1; quick 0.1)")
    p.add_argument("--activation", default="sigmoid", help="autoencoder nonlinearity (sigmoid)")
    p.add_argument("--init", default="torch", help="autoencoder init: torch or sparse (torch)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (2; quick 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (cpu)")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed (0)")
    p.add_argument("--factor-every", type=int, help="KFE factor_every (10; quick 2)")
    p.add_argument("--basis-every", type=int, help="KFE basis_every (100; quick 6)")
    p.add_argument("--lambda-every", type=int, help="ekfac-ema lambda_every (10; quick 2)")
    p.add_argument("--soap-frequency", type=int, help="SOAP precondition_frequency (10; quick 3)")
    p.add_argument("--kfe-momentum", type=float, default=0.0, help="KFE heavy-ball momentum (0)")
    p.add_argument(
        "--kfe-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra KFEOptimizer setting for kfac/ekfac (repeatable, YAML value), e.g.\n"
        "--kfe-set fisher=\"'true'\" --kfe-set factor_decay=0.9",
    )
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    p.add_argument(
        "--blowup",
        type=float,
        default=5.0,
        help="also stop a grid point as diverged when its loss exceeds this many times\n"
        "the initial loss (5; 0 disables)",
    )
    p.add_argument("--budget", type=float, help="wall-clock budget in s (Adam's total time)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every curve as JSON")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--estimate-only", action="store_true", help="print the runtime estimate and stop"
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "steps": (480, 12),
        "batch": (1000, 100),
        "eval_every": (40, 4),
        "train_limit": (None, QUICK_TRAIN_LIMIT),
        "width": (1.0, 0.1),
        "threads": (2, 1),
        "factor_every": (10, 2),
        "basis_every": (100, 6),
        "lambda_every": (10, 2),
        "soap_frequency": (10, 3),
    }
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    for key in ("steps", "batch", "eval_every", "eval_batch", "threads", "factor_every"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    args.grids = parse_grid(args.grid, QUICK_GRID if quick else DEFAULT_GRID)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(OPTIMIZERS))
        if unknown:
            p.error(f"--only: unknown {unknown}; known: {', '.join(OPTIMIZERS)}")
        args.optimizers = [n for n in OPTIMIZERS if n in wanted]
    else:
        args.optimizers = list(OPTIMIZERS)
    return args


def choose_dataset(args: argparse.Namespace) -> str:
    """``mnist``; in quick mode ``synthetic32`` when MNIST is not installed (said so)."""
    try:
        load_dataset("mnist", train_limit=1, test_limit=1)
    except DatasetNotFound as exc:
        if not args.quick:
            raise SystemExit(f"MNIST is needed for this benchmark:\n{exc}") from None
        print("NOTE: MNIST not found offline; the quick run uses synthetic32 images instead.")
        return "synthetic32"
    return "mnist"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes."""
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    soap, soap_version = load_soap()
    if "soap" in args.optimizers and soap is None:
        print(
            f"NOTE: pytorch-optimizer's SOAP is {soap_version}: 'soap' is skipped. It is an "
            "optional benchmark dependency: pip install --no-deps pytorch-optimizer"
        )
        args.optimizers.remove("soap")
    env = environment(soap_version)
    print(f"command: {env['command']}")
    print(
        f"kfe {env['kfe']} from {env['kfe_path']} (git {env['kfe_git']}), torch {env['torch']}, "
        f"pytorch-optimizer {soap_version}, python {env['python']}, threads {env['threads']}, "
        f"cpu_count {env['cpu_count']}"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in env['loadavg_start'])}")
    busy = env["cpu_busy_start"]
    if busy is not None:
        print(f"CPU used by other processes just before the start: {busy:.2f} of {os.cpu_count()}")
    if busy is not None and busy > 0.3:
        print(
            f"WARNING: other processes are using {busy:.2f} CPUs: wall-clock times (and their "
            "ratios, eigh above all) are unreliable on a busy machine. Rerun when it is idle."
        )
    dataset = choose_dataset(args)
    builder = Builder(args, dataset, soap)
    points = [p for name in args.optimizers for p in args.grids[name]]
    for point in points:  # every config error before any training
        try:
            experiment_config(point, args, dataset)
        except ConfigError as exc:
            raise SystemExit(f"{point.key}: bad setting:\n{exc}") from None
    width = "" if args.width == 1 else f" (width {args.width:g})"
    print(
        f"data: {dataset}, {args.train_limit or 'all'} training images; model: autoencoder"
        f"{width}, {args.activation}, init {args.init}; loss: BCE-with-logits summed over "
        f"pixels, mean over the batch; batch {args.batch}, {args.steps} steps, full "
        f"training-set evaluation every {args.eval_every} steps (not timed)"
    )
    print(
        f"KFE: factor_every {args.factor_every}, basis_every {args.basis_every}, lambda_every "
        f"{args.lambda_every} (ekfac-batch: 1), momentum {args.kfe_momentum}; SGD momentum "
        f"{args.sgd_momentum}; SOAP precondition_frequency {args.soap_frequency}"
    )
    print(
        "grid: "
        + "; ".join(f"{n}: {', '.join(p.short for p in args.grids[n])}" for n in args.optimizers)
    )
    sys.stdout.flush()

    # runtime estimate from a few steps of each optimizer's first grid point
    estimates: dict[str, dict[str, float]] = {}
    eval_s = None
    for name in args.optimizers:
        estimates[name] = calibrate(builder, args.grids[name][0], args, eval_s)
        eval_s = estimates[name]["one_eval_s"]
    total = sum((e["train_s"] + e["eval_s"]) * len(args.grids[n]) for n, e in estimates.items())
    print("\ncalibration (a few untimed steps; ms/step after the first, first step in ()):")
    for name, e in estimates.items():
        print(
            f"  {name:12s} {1e3 * e['step_s']:7.0f} ms/step ({1e3 * e['first_step_s']:.0f} ms)"
            f"  ~{e['train_s'] + e['eval_s']:.0f} s per grid point x {len(args.grids[name])}"
        )
    print(
        f"one full training-set evaluation: {eval_s or 0:.1f} s\n"
        f"estimated runtime: {total / 60:.1f} min ({total:.0f} s) at this machine's current "
        "load, after this calibration"
    )
    results: dict[str, Any] = {
        "environment": env,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("grids", "grid")
        },
        "dataset": dataset,
        "grid": {n: [p.short for p in args.grids[n]] for n in args.optimizers},
        "estimate": {"per_optimizer": estimates, "total_s": total},
    }
    if args.estimate_only:
        torch.set_num_threads(previous_threads)
        return results

    runs: list[Run] = []
    for i, point in enumerate(points, 1):
        exp = builder.build(point)
        run = Run(point, settings_of(exp, point), init_checksum=init_checksum(exp))
        log(f"[{i}/{len(points)}] {point.key}")
        gc.collect()
        train_point(exp, run, args, log)
        end = f"final loss {run.final_loss:.3f}" if run.ok else f"{run.status}: {run.message}"
        log(
            f"  done: train {run.train_time:.1f} s, eval {run.eval_time:.1f} s, {end} "
            f"(load {os.getloadavg()[0]:.2f})"
        )
        runs.append(run)
        del exp
    checksums = {r.init_checksum for r in runs}
    same_init = builder.same_init and len(checksums) <= 1
    print(
        f"\nsame initial weights for every grid point: {'yes' if same_init else 'NO'} "
        f"(parameter-sum checksum {', '.join(f'{c:.6f}' for c in sorted(checksums))})"
    )
    summary = summarize(runs, args.optimizers, args)
    print_report(runs, args.optimizers, summary, args)
    env["loadavg_end"] = list(os.getloadavg())
    env["runtime_s"] = time.perf_counter() - start
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in env['loadavg_end'])}")
    print(f"total runtime: {env['runtime_s']:.1f} s (estimate was {total:.0f} s)")
    results.update(
        {
            "same_initial_weights": same_init,
            "runs": [r.to_json() for r in runs],
            "summary": summary,
        }
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(jsonable(results), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
    if args.plot:
        title = (
            f"{dataset} autoencoder, batch {args.batch}, {args.steps} steps, "
            f"{args.threads} thread(s); best grid point each"
        )
        for path in write_plots(runs, args.optimizers, summary, args.plot, title):
            print(f"wrote {path}")
    torch.set_num_threads(previous_threads)
    return results


if __name__ == "__main__":
    main()
