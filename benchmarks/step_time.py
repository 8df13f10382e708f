"""Forward + backward + step time of kfe optimizers against SGD and Adam.

Model: the MNIST deep auto-encoder shape of Hinton & Salakhutdinov (2006), used by
Martens (2010), Martens & Grosse (2015) and George et al. (2018):
``Linear`` layers 784-1000-500-250-30-250-500-1000-784, ``tanh`` after every layer
except the 30-unit code layer (linear, as in the paper) and the output layer, whose
784 logits go into ``binary_cross_entropy_with_logits`` against the input (pixels in
[0, 1], the paper's cross-entropy reconstruction loss). Input: ``torch.rand`` batches,
generated once before timing. Every optimizer gets its own copy of the same initial
model.

Amortized cost. The KFE optimizers do extra work every ``factor_every`` steps (factor
EMAs), every ``lambda_every`` steps (EKFAC's Lambda) and every ``basis_every`` steps
(eigendecompositions), so only windows made of whole cycles measure the amortized
cost. With ``--window W`` (a multiple of ``factor_every`` that divides ``basis_every``)
each repeat times, per optimizer,

- a *refresh window*: ``W`` steps starting at a refresh step (``step % basis_every == 0``),
- a *plain window*: the next ``W`` steps (no refresh; only when ``W < basis_every``),

and the amortized per-step time of one basis cycle is

    (T_refresh + (basis_every / W - 1) * T_plain) / basis_every,

which is exactly the time of ``basis_every`` consecutive steps, because every
``W``-step stretch of a cycle other than the one holding the refresh does the same
work. With ``W = basis_every`` a repeat is one full cycle. To reach the next refresh
step without running the steps in between, the optimizer's step counter is
fast-forwarded through its public ``state_dict`` / ``load_state_dict`` (the cadences
depend only on ``step % every``), outside the timed region. The reported number is the
median over ``--repeats`` of the amortized per-step time; the optimizers run
round-robin (the starting optimizer rotates each repeat) so that drift in machine
speed hits all of them alike.

The default window is one factor cycle (``factor_every`` steps) to keep the default run
under ten minutes on a 2-core machine; see ``benchmarks/README.md``.

Per-phase breakdown. Each ``KFEOptimizer`` is then profiled with ``torch.profiler``
(CPU) over one refresh window and one plain window of ``--profile-window`` steps,
combined with the same formula. Every ``record_function`` range the library opens
(``kfe/capture`` in its hooks, ``kfe/factors``, ``kfe/eigh``, ``kfe/lambda``,
``kfe/project``, ``kfe/rule``, ``kfe/unproject``, ``kfe/fallback``, and any new
``kfe/...`` name) is attributed to the forward, backward or step phase enclosing it and
reported per step, next to those phases' times from ``time.perf_counter``.

Grid suite (``--suite grid``). Every compatible (rule, basis) pair of the installed
registry (:func:`kfe.testing.compatible_cases`, so plugins show up), plus
``torch.optim.Adam`` (the reference) and, when the optional benchmark dependency
``pytorch-optimizer`` is installed, its ``SOAP`` (row ``pto-soap``), all refreshing
every 10 steps: KFE with ``factor_every=1``, ``basis_every=10``, ``lambda_every=1``;
SOAP with ``precondition_frequency=10``. The window is one whole cycle (10 steps
starting at a refresh), so the amortized time is simply the window's time over its
length; ``--window 20`` times two cycles. SOAP's refresh depends on its own call count
(its first ``step()`` only initialises and does not update), so the warm-up covers that
call and SOAP is aligned to its refresh by untimed steps. The summary adds a rule x
basis matrix of ratios to Adam and the ratio of KFE ``adam`` on ``shampoo`` (SOAP) to
``pto-soap`` with its target (``<= 0.8``). Only ``adam-shampoo`` and ``pto-soap`` are
profiled by default (``--profile-only``); SOAP's methods are wrapped in ``soap/...``
ranges for that profile only, after all timing.

Usage::

    python benchmarks/step_time.py                  # the default benchmark
    python benchmarks/step_time.py --quick          # smoke run, a few seconds
    python benchmarks/step_time.py --json out.json  # also write the results
    python benchmarks/step_time.py --suite grid     # every rule x basis, Adam, SOAP
    python benchmarks/step_time.py --suite grid --quick  # smoke run of the grid
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import kfe
import kfe.testing
from kfe.profiling import PHASES

FULL_DIMS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_DIMS = (64, 48, 32, 16, 4, 16, 32, 48, 64)
CODE_WIDTH_INDEX = 4  # index in dims of the linear code layer (no activation after it)
RANGES = PHASES  # display order; other kfe/ ranges are listed after these
REFERENCE = "adam"
SOAP_NAME = "pto-soap"  # pytorch-optimizer's SOAP (grid suite, optional dependency)
SOAP_KFE = "adam-shampoo"  # KFE's SOAP: rule adam on the shampoo basis
SOAP_TARGET = 0.8  # goal for SOAP_KFE's amortized time over SOAP_NAME's
GRID_REPEATS = 3  # default --repeats of the grid suite (runtime: see the README)
SOAP_RANGES = ("soap/factors", "soap/qr", "soap/project")  # profile-only wrappers
RANGE_PREFIXES = ("kfe/", "soap/")
# The project's goals for the amortized ratio to Adam (full-size model, batch 1000).
TARGETS = {"ekfac-ema": 2.2, "ekfac-batch": 3.0, "kfac-split": 1.6, "kfac-product": 2.2}


# -- model and data ------------------------------------------------------------------


def autoencoder(dims: tuple[int, ...]) -> nn.Sequential:
    """Linear layers with tanh between them, none after the code layer or the output."""
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i != last and i + 1 != CODE_WIDTH_INDEX:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def loss_fn(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(x), x)


# -- optimizers ----------------------------------------------------------------------


@dataclass
class Entry:
    """One optimizer under test, with its own model copy and its measurements."""

    name: str
    label: str
    model: nn.Module
    opt: torch.optim.Optimizer
    calls: int = 0  # optimizer.step() calls made
    skipped: int = 0  # KFE steps skipped (non-finite gradient)
    refresh: list[dict[str, float]] = field(default_factory=list)
    plain: list[dict[str, float]] = field(default_factory=list)
    amortized: list[dict[str, float]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    last_loss: float = math.nan
    period: int = 0  # > 0: refreshes when ``calls % period == 0`` (SOAP's own counter)
    info: dict[str, Any] = field(default_factory=dict)  # rule/basis etc. for the JSON
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # ``--compile``'s model

    @property
    def is_kfe(self) -> bool:
        return isinstance(self.opt, kfe.KFEOptimizer)


Spec = tuple[str, str, Callable[[nn.Module], torch.optim.Optimizer]]


def build_entries(args: argparse.Namespace, base: nn.Module) -> list[Entry]:
    """One entry per optimizer of the suite, in display order (``--only`` filters)."""
    extras: dict[str, dict[str, Any]] = {}
    specs = grid_specs(args, extras) if args.suite == "grid" else default_specs(args)
    wanted = set(args.only.split(",")) | {REFERENCE} if args.only else None
    known = {name for name, _, _ in specs} | set(extras.get("_missing", {}))
    if wanted and not wanted <= known:
        raise SystemExit(f"--only: unknown {sorted(wanted - known)}; known: {sorted(known)}")
    if args.compile:  # Adam's hookless copy is traced first: see docs/optimizer.md#torchcompile
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    entries = []
    for name, label, make in specs:
        if wanted is None or name in wanted:
            model = copy.deepcopy(base)
            extra = extras.get(name, {})
            entries.append(
                Entry(
                    name,
                    label,
                    model,
                    make(model),
                    period=extra.get("period", 0),
                    info=extra.get("info", {}),
                    forward=torch.compile(model) if args.compile else None,
                )
            )
    return entries


def default_specs(args: argparse.Namespace) -> list[Spec]:
    """The default suite: SGD, Adam and the KFE optimizers the project has targets for."""
    kfe_common = {
        "eigensolver": args.eigensolver,
        "matmul_dtype": args.matmul_dtype,
        "fp32_matmul_precision": args.fp32_matmul_precision,
        "lr": args.kfe_lr,
        "damping": args.damping,
        "momentum": args.momentum,
        "factor_every": args.factor_every,
        "basis_every": args.basis_every,
    }
    specs: list[tuple[str, str, Callable[[nn.Module], torch.optim.Optimizer]]] = [
        (
            "sgd",
            f"torch.optim.SGD(lr={args.sgd_lr}, momentum={args.momentum})",
            lambda m: torch.optim.SGD(m.parameters(), lr=args.sgd_lr, momentum=args.momentum),
        ),
        (
            "adam",
            f"torch.optim.Adam(lr={args.adam_lr})",
            lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr),
        ),
        ("kfe-sgd", "KFE rule=sgd", lambda m: kfe.KFEOptimizer(m, rule="sgd", **kfe_common)),
        (
            "kfac-product",
            "KFE rule=kfac damping_mode=product",
            lambda m: kfe.KFEOptimizer(
                m, rule={"name": "kfac", "damping_mode": "product"}, **kfe_common
            ),
        ),
        (
            "kfac-split",
            "KFE rule=kfac damping_mode=split",
            lambda m: kfe.KFEOptimizer(
                m, rule={"name": "kfac", "damping_mode": "split"}, **kfe_common
            ),
        ),
        (
            "ekfac-ema",
            f"KFE rule=ekfac estimator=ema lambda_every={args.factor_every}",
            lambda m: kfe.KFEOptimizer(
                m,
                rule={"name": "ekfac", "estimator": "ema"},
                lambda_every=args.factor_every,
                **kfe_common,
            ),
        ),
        (
            "ekfac-batch",
            "KFE rule=ekfac estimator=batch lambda_every=1",
            lambda m: kfe.KFEOptimizer(
                m, rule={"name": "ekfac", "estimator": "batch"}, lambda_every=1, **kfe_common
            ),
        ),
    ]
    return specs


def load_soap() -> tuple[type[torch.optim.Optimizer] | None, str]:
    """pytorch-optimizer's ``SOAP`` and its version, imported lazily (optional)."""
    try:
        from pytorch_optimizer import SOAP  # optional benchmark dependency, never a runtime one
    except ImportError as exc:
        return None, f"not importable ({exc})"
    try:
        return SOAP, importlib.metadata.version("pytorch_optimizer")
    except importlib.metadata.PackageNotFoundError:
        return SOAP, "unknown"


def grid_specs(args: argparse.Namespace, extras: dict[str, dict[str, Any]]) -> list[Spec]:
    """The grid suite: torch Adam, pytorch-optimizer's SOAP, every compatible rule x basis.

    All refresh every ``basis_every`` steps. KFE: factors every ``factor_every`` step(s),
    ``lambda_every=1`` (only rules that need per-example statistics use it), heavy-ball
    ``momentum`` except for ``adam``, whose own first moment plays that part (as in SOAP).
    """
    specs: list[Spec] = [
        (
            "adam",
            f"torch.optim.Adam(lr={args.adam_lr})",
            lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr),
        )
    ]
    soap, soap_version = load_soap()
    args.soap_version = soap_version
    if soap is None:
        print(
            f"NOTE: pytorch-optimizer's SOAP is {soap_version}: the {SOAP_NAME!r} row is "
            "skipped. It is an optional benchmark dependency: "
            "pip install --no-deps pytorch-optimizer"
        )
        extras["_missing"] = {SOAP_NAME: {}}
    else:
        soap_kwargs = {
            "lr": args.adam_lr,
            "betas": (0.9, 0.999),
            "shampoo_beta": args.factor_decay,
            "weight_decay": 0.0,
            "precondition_frequency": args.basis_every,
        }
        specs.append(
            (
                SOAP_NAME,
                f"pytorch_optimizer.SOAP {soap_version} ("
                + ", ".join(f"{k}={v}" for k, v in soap_kwargs.items())
                + ")",
                lambda m: soap(m.parameters(), **soap_kwargs),
            )
        )
        extras[SOAP_NAME] = {
            "period": args.basis_every,
            "info": {"package": "pytorch-optimizer", "version": soap_version, **soap_kwargs},
        }
    for rule, basis in kfe.testing.compatible_cases(kfe.default_registry()):
        settings = {
            "rule": rule,
            "basis": basis,
            "lr": args.kfe_lr,
            "damping": args.damping,
            "momentum": 0.0 if rule == "adam" else args.momentum,
            "factor_every": args.factor_every,
            "basis_every": args.basis_every,
            "lambda_every": 1,
            "factor_decay": args.factor_decay,
            "eigensolver": args.eigensolver,
            "matmul_dtype": args.matmul_dtype,
            "fp32_matmul_precision": args.fp32_matmul_precision,
        }
        name = f"{rule}-{basis}"
        label = "KFE " + ", ".join(f"{k}={v}" for k, v in settings.items())
        specs.append((name, label, functools.partial(make_kfe, settings=settings)))
        extras[name] = {"info": settings}
    return specs


def make_kfe(model: nn.Module, settings: dict[str, Any]) -> kfe.KFEOptimizer:
    return kfe.KFEOptimizer(model, **settings)


# -- timing --------------------------------------------------------------------------


def next_refresh(step: int, basis_every: int) -> int:
    return -(-step // basis_every) * basis_every


def align_to_refresh(
    entry: Entry, basis_every: int, batches: list[torch.Tensor] | None = None
) -> None:
    """Fast-forward a KFE optimizer's step counter to the next refresh step.

    Goes through the public ``state_dict``/``load_state_dict``; the pipeline's cadences
    depend only on ``step % every``, so the steps skipped would have done nothing that
    the following steps depend on for their cost.

    An optimizer with a ``period`` (pytorch-optimizer's SOAP, whose refresh is at the
    calls ``k > 0`` with ``k % period == 0``, counted from 0) is brought there by
    untimed steps on ``batches`` instead.
    """
    opt = entry.opt
    if entry.period:
        assert batches is not None, "a periodic optimizer is aligned by running steps"
        while entry.calls == 0 or entry.calls % entry.period:
            run_steps(entry, batches, 1)
        return
    if not isinstance(opt, kfe.KFEOptimizer):
        return
    target = next_refresh(opt.steps_taken, basis_every)
    if target != opt.steps_taken:
        state = opt.state_dict()
        state["kfe"]["step"] = target
        opt.load_state_dict(state)


def run_steps(
    entry: Entry, batches: list[torch.Tensor], n: int, annotate: bool = False
) -> dict[str, float]:
    """``n`` training steps; seconds spent in forward, backward and step (+ zero_grad).

    ``annotate`` wraps the phases in ``bench/...`` profiler ranges (profiled runs only).
    """
    model, opt = entry.forward or entry.model, entry.opt
    fwd = bwd = stp = 0.0
    before = opt.steps_taken if isinstance(opt, kfe.KFEOptimizer) else 0
    loss = None
    clock = time.perf_counter

    def mark(phase: str) -> contextlib.AbstractContextManager[Any]:
        return record_function(f"bench/{phase}") if annotate else contextlib.nullcontext()

    for _ in range(n):
        x = batches[entry.calls % len(batches)]
        t0 = clock()
        with mark("forward"):
            loss = loss_fn(model, x)
        t1 = clock()
        with mark("backward"):
            loss.backward()
        t2 = clock()
        with mark("step"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = clock()
        fwd += t1 - t0
        bwd += t2 - t1
        stp += t3 - t2
        entry.calls += 1
    if isinstance(opt, kfe.KFEOptimizer):
        entry.skipped += n - (opt.steps_taken - before)
    if loss is not None:
        entry.last_loss = float(loss.detach())
    return {"forward": fwd, "backward": bwd, "step": stp, "total": fwd + bwd + stp}


def timed_window(entry: Entry, batches: list[torch.Tensor], n: int) -> dict[str, float]:
    """``run_steps`` with the cyclic garbage collector off, as ``timeit`` does."""
    gc.collect()
    gc.disable()
    try:
        return run_steps(entry, batches, n)
    finally:
        gc.enable()


def amortize(
    refresh: dict[str, float], plain: dict[str, float] | None, window: int, basis_every: int
) -> dict[str, float]:
    """Per-step seconds of one basis cycle from a refresh window and a plain window.

    A window of whole cycles (a multiple of ``basis_every``, grid suite) needs no plain
    window: its per-step time is its time over its length.
    """
    if window >= basis_every:
        return {key: value / window for key, value in refresh.items()}
    k = basis_every // window
    out = {}
    for key, value in refresh.items():
        other = 0.0 if plain is None else plain[key]
        out[key] = (value + (k - 1) * other) / basis_every
    return out


def benchmark(
    entries: list[Entry], batches: list[torch.Tensor], args: argparse.Namespace, log: Callable
) -> None:
    window, basis_every = args.window, args.basis_every
    for entry in entries:
        run_steps(entry, batches, args.warmup)
        log(f"  warm-up {entry.name}: done")
    for r in range(args.repeats):
        shift = r % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            align_to_refresh(entry, basis_every, batches)
            ref = timed_window(entry, batches, window)
            plain = timed_window(entry, batches, window) if window < basis_every else None
            entry.refresh.append(ref)
            if plain is not None:
                entry.plain.append(plain)
            entry.amortized.append(amortize(ref, plain, window, basis_every))
            log(
                f"  repeat {r + 1}/{args.repeats} {entry.name}: "
                f"{1e3 * entry.amortized[-1]['total']:.1f} ms/step "
                f"(load {os.getloadavg()[0]:.2f})"
            )


def median_of(entry: Entry, key: str) -> float:
    return statistics.median(a[key] for a in entry.amortized)


# -- profiling -----------------------------------------------------------------------

PHASES = ("forward", "backward", "step")


def profiled_window(entry: Entry, batches: list[torch.Tensor], n: int) -> dict[str, Any]:
    """Profile ``n`` steps; CPU seconds per (phase, ``kfe/`` range) and per (phase, op).

    Each event is attributed to the ``bench/forward``, ``bench/backward`` or
    ``bench/step`` range that encloses it, so a range the library opens in a hook (e.g.
    ``kfe/capture``) is reported under the phase that pays for it. Only the outermost
    ``kfe/`` range of a nest counts towards its phase, so they can be summed. The
    ``soap/`` ranges (grid suite, SOAP's methods wrapped for the profile) nest
    (``soap/qr`` inside ``soap/factors``): each counts its time outside the ``soap/``
    ranges inside it, so they can be summed too.
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = run_steps(entry, batches, n, annotate=True)
    ranges: dict[tuple[str, str], dict[str, float]] = {}
    ops: dict[tuple[str, str], float] = {}
    for ev in prof.events():
        is_range = ev.name.startswith(RANGE_PREFIXES)
        is_op = ev.name.startswith("aten::")
        if not (is_range or is_op):
            continue
        phase, nested, parent = None, False, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("bench/"):
                phase = parent.name.removeprefix("bench/")
                break
            nested = nested or parent.name.startswith("kfe/")
            parent = parent.cpu_parent
        if phase is None:
            continue
        if is_op:
            ops[phase, ev.name] = ops.get((phase, ev.name), 0.0) + ev.self_cpu_time_total * 1e-6
        elif ev.name.startswith("soap/"):
            r = ranges.setdefault((phase, ev.name), {"count": 0, "total": 0.0, "self": 0.0})
            r["count"] += 1
            r["total"] += (ev.cpu_time_total - inner_ranges_time(ev, "soap/")) * 1e-6
            r["self"] += ev.self_cpu_time_total * 1e-6
        elif not nested:
            r = ranges.setdefault((phase, ev.name), {"count": 0, "total": 0.0, "self": 0.0})
            r["count"] += 1
            r["total"] += ev.cpu_time_total * 1e-6
            r["self"] += ev.self_cpu_time_total * 1e-6
    return {"times": times, "ranges": ranges, "ops": ops}


def inner_ranges_time(event: Any, prefix: str) -> float:
    """Inclusive time (us) of the outermost ``prefix`` ranges strictly inside ``event``."""
    total = 0.0
    for child in event.cpu_children:
        if child.name.startswith(prefix):
            total += child.cpu_time_total
        else:
            total += inner_ranges_time(child, prefix)
    return total


@contextlib.contextmanager
def soap_ranges(opt: torch.optim.Optimizer) -> Any:
    """Wrap SOAP's methods in ``soap/...`` profiler ranges, on this instance, for a while.

    ``update_pre_conditioner`` (the factor EMAs ``G G^T``, ``G^T G``, and the refresh)
    is ``soap/factors``; the refresh inside it, ``get_orthogonal_matrix_qr`` (one power
    iteration and a QR per factor), is ``soap/qr``; ``project`` (both directions) is
    ``soap/project``. Used for the profile only, after every timed window.
    """
    names = {
        "update_pre_conditioner": "soap/factors",
        "get_orthogonal_matrix_qr": "soap/qr",
        "project": "soap/project",
    }

    def wrap(method: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return method(*args, **kwargs)

        return wrapped

    for attr, label in names.items():
        setattr(opt, attr, wrap(getattr(opt, attr), label))
    try:
        yield
    finally:
        for attr in names:
            delattr(opt, attr)


def range_order(name: str) -> tuple[int, str]:
    order = RANGES + SOAP_RANGES
    return (order.index(name) if name in order else len(order), name)


def profile_entry(
    entry: Entry, batches: list[torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Per-phase seconds per step of one basis cycle, from two profiled windows.

    A window of whole cycles (a multiple of ``basis_every``, grid suite) is profiled
    alone and divided by its length.
    """
    w, basis_every = args.profile_window, args.basis_every
    align_to_refresh(entry, basis_every, batches)
    wrapped = soap_ranges(entry.opt) if entry.period else contextlib.nullcontext()
    with wrapped:
        windows = [profiled_window(entry, batches, w)]
        if w < basis_every:
            windows.append(profiled_window(entry, batches, w))
    weights = [1, basis_every // w - 1][: len(windows)]
    cycle = max(w, basis_every)

    def combine(values: list[float]) -> float:
        """Per-step value of a basis cycle from the per-window values."""
        return sum(wt * v for wt, v in zip(weights, values, strict=True)) / cycle

    out: dict[str, Any] = {
        "perf_counter": {
            key: combine([p["times"][key] for p in windows]) for key in (*PHASES, "total")
        },
        "ranges": {phase: {} for phase in PHASES},
        "top_ops": {phase: {} for phase in PHASES},
    }
    keys = sorted(
        {key for p in windows for key in p["ranges"]},
        key=lambda k: (PHASES.index(k[0]), range_order(k[1])),
    )
    empty = {"count": 0, "total": 0.0, "self": 0.0}
    for key in keys:
        per_window = [p["ranges"].get(key, empty) for p in windows]
        stats = {f: combine([r[f] for r in per_window]) for f in ("total", "self")}
        stats["calls_per_cycle"] = combine([r["count"] for r in per_window]) * basis_every
        out["ranges"][key[0]][key[1]] = stats
    for phase in PHASES:
        names = {op for p in windows for (ph, op) in p["ops"] if ph == phase}
        per_op = {op: combine([p["ops"].get((phase, op), 0.0) for p in windows]) for op in names}
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top_ops]
        out["top_ops"][phase] = dict(top)
    return out


# -- report --------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{1e3 * seconds:9.2f}"


def paired_ratios(entry: Entry, ref: Entry) -> list[float]:
    """Per-repeat ratio to the reference's time in the same repeat."""
    return [a["total"] / b["total"] for a, b in zip(entry.amortized, ref.amortized, strict=True)]


def ratio_to_reference(entry: Entry, ref: Entry) -> float:
    """Median amortized time over the reference's median amortized time."""
    return median_of(entry, "total") / median_of(ref, "total")


def calibrated_ratio(entry: Entry, ref: Entry) -> float:
    """The ratio with the VM's speed drift divided out: median of ``total / (forward +
    backward)`` over the reference's. Forward and backward run the same ops for every
    optimizer, so they act as a clock inside each window; a spell where the machine is
    slower for one optimizer's windows than for Adam's moves the plain ratio, not this
    one. Biased in kfe's favour where it captures: the hooks run inside forward and
    backward and lengthen the clock (by ~4% for ``ekfac`` batch, which captures every
    step; ~0.5% at one capture in 10 steps; nothing for SOAP, which has no hooks).
    Reported beside the plain ratio, never used for the target verdict."""

    def per_clock(e: Entry) -> float:
        return statistics.median(a["total"] / (a["forward"] + a["backward"]) for a in e.amortized)

    return per_clock(entry) / per_clock(ref)


def targets_apply(args: argparse.Namespace) -> bool:
    """The targets are for the full model at batch 1000 with the default cadences."""
    setting = (args.dims, args.batch, args.factor_every, args.basis_every)
    return setting == (FULL_DIMS, 1000, 10, 100)


def print_summary(entries: list[Entry], args: argparse.Namespace) -> None:
    ref = next(e for e in entries if e.name == REFERENCE)
    width = max(14, 2 + max(len(e.name) for e in entries))
    print()
    print(
        f"Amortized time per step over a {args.basis_every}-step cycle, median of "
        f"{args.repeats} repeat(s), ms"
    )
    header = (
        f"{'optimizer':<{width}}{'total':>9}{'forward':>9}{'backward':>9}{'step':>9}"
        f"{'x Adam':>8}{'min':>7}{'max':>7}{'target':>8}{'cal.':>7}"
        "   ms/step refresh | plain window"
    )
    print(header)
    print("-" * len(header))
    for e in entries:
        ratios = paired_ratios(e, ref)
        ratio = ratio_to_reference(e, ref)
        target = TARGETS.get(e.name) if targets_apply(args) else None
        verdict = "" if target is None else f"{target:.1f}{' ok' if ratio <= target else ' NO'}"
        ref_ms = statistics.median(w["total"] for w in e.refresh) / args.window
        plain_ms = (
            f"{1e3 * statistics.median(w['total'] for w in e.plain) / args.window:.1f}"
            if e.plain
            else "-"
        )
        print(
            f"{e.name:<{width}}"
            + "".join(
                f"{1e3 * median_of(e, k):9.1f}" for k in ("total", "forward", "backward", "step")
            )
            + f"{ratio:8.2f}{min(ratios):7.2f}{max(ratios):7.2f}{verdict:>8}"
            f"{calibrated_ratio(e, ref):7.2f}   {1e3 * ref_ms:.1f} | {plain_ms}"
        )
    print(
        "(x Adam: median total / Adam's median total; min/max: range of the per-repeat "
        "ratio to Adam's time in the same repeat; target: the project's goal, shown for "
        "the full model at batch 1000 with factor_every 10 and basis_every 100; ok if "
        "x Adam <= target; cal.: the ratio in units of each window's own forward + "
        "backward time, which divides out the machine's speed drift between windows; "
        "shown beside x Adam, not used for the verdict)"
    )
    if args.suite == "grid":
        print_grid(entries, args)


def soap_comparison(entries: list[Entry]) -> dict[str, Any] | None:
    """KFE's SOAP (``adam`` on ``shampoo``) against pytorch-optimizer's, if both ran."""
    by_name = {e.name: e for e in entries}
    ours, theirs = by_name.get(SOAP_KFE), by_name.get(SOAP_NAME)
    if ours is None or theirs is None:
        return None
    ratio = ratio_to_reference(ours, theirs)
    return {
        "kfe": SOAP_KFE,
        "soap": SOAP_NAME,
        "ratio": ratio,
        "ratios_per_repeat": paired_ratios(ours, theirs),
        "calibrated_ratio": calibrated_ratio(ours, theirs),
        "target": SOAP_TARGET,
        "ok": ratio <= SOAP_TARGET,
        "ms_per_step": {
            name: {k: 1e3 * median_of(e, k) for k in ("total", "forward", "backward", "step")}
            for name, e in ((SOAP_KFE, ours), (SOAP_NAME, theirs))
        },
    }


def print_grid(entries: list[Entry], args: argparse.Namespace) -> None:
    """Rule x basis matrix of the ratio to Adam, and KFE's SOAP against pytorch-optimizer's."""
    ref = next(e for e in entries if e.name == REFERENCE)
    cells = {(e.info["rule"], e.info["basis"]): e for e in entries if "rule" in e.info}
    rules = sorted({r for r, _ in cells})
    bases = sorted({b for _, b in cells})
    print()
    print("x Adam by rule (rows) and basis (columns); '-': incompatible or not run")
    print(f"{'rule':<10}" + "".join(f"{b:>10}" for b in bases))
    for rule in rules:
        row = "".join(
            f"{ratio_to_reference(cells[rule, b], ref):10.2f}"
            if (rule, b) in cells
            else f"{'-':>10}"
            for b in bases
        )
        print(f"{rule:<10}{row}")
    soap = next((e for e in entries if e.name == SOAP_NAME), None)
    if soap is not None:
        print(f"{SOAP_NAME} ({soap.label}): {ratio_to_reference(soap, ref):.2f} x Adam")
    print()
    cmp = soap_comparison(entries)
    if cmp is None:
        print(
            f"KFE {SOAP_KFE} / {SOAP_NAME}: not available ({SOAP_NAME} or {SOAP_KFE} did not "
            "run; pytorch-optimizer is an optional dependency)"
        )
        return
    ms = cmp["ms_per_step"]
    verdict = "ok" if cmp["ok"] else "NO"
    print(
        f"KFE {SOAP_KFE} / {SOAP_NAME}: {cmp['ratio']:.2f}x "
        f"(per repeat {min(cmp['ratios_per_repeat']):.2f}-{max(cmp['ratios_per_repeat']):.2f}); "
        f"target <= {SOAP_TARGET}x: {verdict}; calibrated {cmp['calibrated_ratio']:.2f}x"
    )
    print(
        f"  ms/step total {ms[SOAP_KFE]['total']:.1f} vs {ms[SOAP_NAME]['total']:.1f}; "
        f"step alone {ms[SOAP_KFE]['step']:.1f} vs {ms[SOAP_NAME]['step']:.1f} "
        f"({ms[SOAP_KFE]['step'] / ms[SOAP_NAME]['step']:.2f}x); "
        f"forward + backward {ms[SOAP_KFE]['forward'] + ms[SOAP_KFE]['backward']:.1f} vs "
        f"{ms[SOAP_NAME]['forward'] + ms[SOAP_NAME]['backward']:.1f}"
    )


def print_breakdown(entries: list[Entry], args: argparse.Namespace) -> None:
    print()
    windows = (
        f"one window of {args.profile_window} steps, whole cycles"
        if args.profile_window >= args.basis_every
        else f"one refresh window + one plain window of {args.profile_window} steps"
    )
    print(
        f"Per-phase breakdown, ms/step amortized over a {args.basis_every}-step cycle "
        f"(torch.profiler CPU; {windows}, combined as above)"
    )
    for e in entries:
        if not e.profile:
            continue
        p = e.profile
        pc = p["perf_counter"]
        print(f"\n{e.name}  ({e.label}); profiled total {fmt_ms(pc['total']).strip()} ms/step")
        print(
            f"  {'phase / range':<18}{'total':>9}{'self':>9}{'% phase':>9}"
            f"{'calls/cycle':>13}{'ms/call':>10}"
        )
        for phase in PHASES:
            t = pc[phase]
            print(f"  {phase:<18}{fmt_ms(t)}{'':>9}{'':>9}")
            accounted = 0.0
            for name, r in p["ranges"][phase].items():
                accounted += r["total"]
                per_call = r["total"] * args.basis_every / max(r["calls_per_cycle"], 1)
                print(
                    f"    {name:<16}{fmt_ms(r['total'])}{fmt_ms(r['self'])}"
                    f"{100 * r['total'] / t:8.1f}%{r['calls_per_cycle']:13.0f}"
                    f"{1e3 * per_call:10.2f}"
                )
            if p["ranges"][phase]:
                rest = t - accounted
                outside = "(no soap/ range)" if e.period else "(no kfe/ range)"
                print(f"    {outside:<16}{fmt_ms(rest)}{'':>9}{100 * rest / t:8.1f}%")
        ops = ", ".join(
            f"{k.removeprefix('aten::')} {1e3 * v:.1f}" for k, v in p["top_ops"]["step"].items()
        )
        print(f"  top aten ops in step, self ms/step: {ops}")
    print(
        "\n(total: inclusive CPU time of a range; self: its time outside any op (Python "
        "overhead); '(no kfe/ range)': time of the phase outside the library's ranges, e.g. "
        "in step: the gradient finiteness check, stacking [W | b], rule on_refresh, "
        "momentum, p.add_ and zero_grad. Profiling inflates times: the table above it is "
        "the unprofiled measurement.)"
    )
    if any(e.period and e.profile for e in entries):
        print(
            f"({SOAP_NAME}: soap/factors = update_pre_conditioner without the refresh (G G^T, "
            "G^T G, lerp); soap/qr = get_orthogonal_matrix_qr (power iteration + QR, every "
            "precondition_frequency steps); soap/project = project(), 3 per matrix per step "
            "(gradient, exp_avg, and back); '(no soap/ range)': Adam moments, p.add_, "
            "zero_grad. Ranges wrapped around SOAP's methods for the profile only.)"
        )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "torch": torch.__version__,
        "kfe": kfe.__version__,
        "kfe_path": os.path.dirname(os.path.abspath(kfe.__file__)),
        "kfe_git": git_revision(os.path.dirname(os.path.abspath(kfe.__file__))),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "loadavg_start": list(os.getloadavg()),
        "cpu_busy_start": cpu_busy(),
    }


def git_revision(path: str) -> str:
    """``<commit>[+dirty]`` of the checkout holding ``path``, or ``"unknown"``."""
    try:
        run = functools.partial(
            subprocess.run, cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no", "."]).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_busy(interval: float = 0.5) -> float | None:
    """CPUs' worth of time others used over ``interval`` s (Linux ``/proc/stat``).

    This process sleeps meanwhile, so it is the load other processes put on the
    machine right now (the load average lags by minutes).
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    busy_fraction = 1 - (idle1 - idle0) / (total1 - total0)
    return busy_fraction * (os.cpu_count() or 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def results_json(entries: list[Entry], args: argparse.Namespace, env: dict[str, Any]) -> Any:
    ref = next(e for e in entries if e.name == REFERENCE)
    return {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "dims": list(args.dims),
        "activation": "tanh (none after the 30-unit code layer), BCE-with-logits output",
        "optimizers": {
            e.name: {
                "label": e.label,
                "ms_per_step": {k: 1e3 * median_of(e, k) for k in e.amortized[0]},
                "ratio_to_adam": ratio_to_reference(e, ref),
                "target_ratio": TARGETS.get(e.name) if targets_apply(args) else None,
                "ratios_to_adam_per_repeat": paired_ratios(e, ref),
                "calibrated_ratio_to_adam": calibrated_ratio(e, ref),
                "repeats_ms_per_step": [1e3 * a["total"] for a in e.amortized],
                "refresh_windows_s": e.refresh,
                "plain_windows_s": e.plain,
                "skipped_steps": e.skipped,
                "final_loss": e.last_loss,
                "profile": e.profile or None,
                **({"settings": e.info} if e.info else {}),
            }
            for e in entries
        },
        **({"soap_comparison": soap_comparison(entries)} if args.suite == "grid" else {}),
    }


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--suite",
        choices=("default", "grid"),
        default="default",
        help="default: SGD, Adam and the KFE optimizers with targets; grid: every compatible "
        "rule x basis, torch Adam and pytorch-optimizer's SOAP, refreshing every 10 steps",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1000; 64 quick)")
    p.add_argument(
        "--factor-every", type=int, default=None, help="KFE factor cadence (default 10; grid 1)"
    )
    p.add_argument(
        "--basis-every",
        type=int,
        default=None,
        help="KFE basis cadence, and SOAP's precondition_frequency (default 100; grid 10)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="timed window in steps: a multiple of --factor-every dividing "
        "--basis-every, or (grid) a multiple of --basis-every (default: --factor-every; "
        "grid: --basis-every; see README)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per optimizer first (default: --factor-every; grid: --basis-every)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed cycles per optimizer (default 3; grid {GRID_REPEATS})",
    )
    p.add_argument(
        "--profile-window",
        type=int,
        default=None,
        help="steps per profiled window (default: --factor-every; grid: --basis-every); 0 disables",
    )
    p.add_argument(
        "--profile-only",
        default=None,
        help="comma-separated optimizers to profile, or 'all' (default: every KFE optimizer; "
        f"grid: {SOAP_KFE},{SOAP_NAME})",
    )
    p.add_argument("--top-ops", type=int, default=6, help="aten ops listed per KFE optimizer")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: the CPUs this process may use; 1 with --quick)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated optimizer names (adam is always run)"
    )
    p.add_argument("--sgd-lr", type=float, default=0.01)
    p.add_argument("--adam-lr", type=float, default=1e-3, help="torch Adam (and grid: SOAP)")
    p.add_argument("--kfe-lr", type=float, default=1e-3)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--momentum", type=float, default=0.9, help="KFE heavy ball (grid: not adam)")
    p.add_argument(
        "--factor-decay",
        type=float,
        default=0.95,
        help="grid: KFE factor_decay and SOAP shampoo_beta",
    )
    p.add_argument(
        "--eigensolver",
        choices=("eigh", "power_qr"),
        default="eigh",
        help="KFE refresh: exact eigh, or SOAP's warm-started power step + QR",
    )
    p.add_argument(
        "--matmul-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="KFE matmul_dtype (default: none, the parameters' float32; docs/precision.md)",
    )
    p.add_argument(
        "--fp32-matmul-precision",
        choices=("ieee", "bf16", "tf32"),
        default=None,
        help="KFE fp32_matmul_precision: the backend precision of the float32 matmuls "
        "matmul_dtype would lower (default: none, the process's; docs/precision.md)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="every optimizer's model runs through torch.compile (inductor; compiled in "
        "the warm-up; docs/optimizer.md#torchcompile)",
    )
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run: small widths, batch 64, a few steps"
    )
    args = p.parse_args(argv)
    grid = args.suite == "grid"
    args.dims = FULL_DIMS
    if args.factor_every is None:
        args.factor_every = 1 if grid else 10
    if args.basis_every is None:
        args.basis_every = 10 if grid else 100
    if args.repeats is None:
        args.repeats = GRID_REPEATS if grid else 3
    if args.quick:
        args.dims = QUICK_DIMS
        if grid:
            args.factor_every, args.basis_every = 1, 4
        else:
            args.factor_every, args.basis_every = 2, 4
            args.window = args.window or 2
        args.repeats = min(args.repeats, 2)
        args.top_ops = min(args.top_ops, 3)
    if args.threads is None:
        args.threads = 1 if args.quick else len(os.sched_getaffinity(0))
    if args.batch is None:
        args.batch = 64 if args.quick else 1000
    cycle = args.basis_every if grid else args.factor_every
    if args.window is None:
        args.window = cycle
    if args.warmup is None:
        args.warmup = cycle
    if args.profile_window is None:
        args.profile_window = cycle
    if args.profile_only is None:
        args.profile_only = f"{SOAP_KFE},{SOAP_NAME}" if grid else "kfe"
    for flag in ("window", "profile_window"):
        w = getattr(args, flag)
        if flag == "profile_window" and w == 0:
            continue
        whole_cycles = grid and w > 0 and w % args.basis_every == 0
        if not whole_cycles and (w <= 0 or w % args.factor_every or args.basis_every % w):
            p.error(
                f"--{flag.replace('_', '-')} {w}: must be a positive multiple of "
                f"--factor-every ({args.factor_every}) that divides --basis-every "
                f"({args.basis_every})" + (", or a multiple of --basis-every" if grid else "")
            )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads_before)
        gc.unfreeze()


def is_profiled(entry: Entry, args: argparse.Namespace) -> bool:
    """``--profile-only``: ``kfe`` (the default suite's default), ``all`` or names."""
    if args.profile_only == "kfe":
        return entry.is_kfe
    if args.profile_only == "all":
        return entry.is_kfe or bool(entry.period)
    return entry.name in args.profile_only.split(",")


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    env = environment(args)
    print(f"command: {env['command']}")
    print(f"kfe {env['kfe']} from {env['kfe_path']} (git {env['kfe_git']})")
    print(
        f"torch {env['torch']}, python {env['python']}, "
        f"threads {env['threads']} (interop {env['interop_threads']}), "
        f"cpu_count {env['cpu_count']}, {env['processor']}"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in env['loadavg_start'])}")
    busy = env["cpu_busy_start"]
    if busy is not None:
        print(f"CPU used by other processes just before the start: {busy:.2f} of {os.cpu_count()}")
    if args.threads > 1 and busy is not None and busy > 0.3:
        print(
            f"WARNING: other processes are using {busy:.2f} CPUs. Multi-threaded MKL/OpenMP "
            "kernels (eigh above all) can then run 10-100x slower, as threads wait for a "
            "descheduled partner at every barrier: rerun on an idle machine, or with "
            "--threads 1."
        )
    print(
        f"model: {'-'.join(map(str, args.dims))}, tanh (code layer linear)"
        f"{', torch.compile' if args.compile else ''}, "
        f"BCE-with-logits; batch {args.batch}; factor_every {args.factor_every}, "
        f"basis_every {args.basis_every}; window {args.window}, warm-up {args.warmup}, "
        f"repeats {args.repeats}, profile window {args.profile_window}"
    )
    if args.suite == "grid":
        print(
            "grid suite: torch Adam, pytorch-optimizer's SOAP (precondition_frequency "
            f"{args.basis_every}) and every compatible KFE rule x basis (lambda_every 1); "
            f"profiled: {args.profile_only}"
        )
    sys.stdout.flush()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s]{msg}", flush=True)

    torch.manual_seed(args.seed)
    base = autoencoder(args.dims)
    batches = [torch.rand(args.batch, args.dims[0]) for _ in range(args.batches)]
    entries = build_entries(args, base)
    if args.suite == "grid":
        env["pytorch_optimizer"] = getattr(args, "soap_version", None)
    gc.collect()
    gc.freeze()  # setup objects out of the collector's way: later collections are cheap
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmark(entries, batches, args, log)
        if args.profile_window:
            for e in entries:
                if is_profiled(e, args):
                    e.profile = profile_entry(e, batches, args)
                    log(f"  profiled {e.name}")
    env["loadavg_end"] = list(os.getloadavg())
    env["runtime_s"] = time.perf_counter() - start

    print_summary(entries, args)
    if args.profile_window:
        print_breakdown(entries, args)
    print()
    for e in entries:
        if e.skipped or not math.isfinite(e.last_loss):
            print(f"WARNING: {e.name}: {e.skipped} skipped step(s), last loss {e.last_loss}")
    for w in {str(w.message) for w in caught}:
        print(f"WARNING during the run: {w}")
    print("final losses: " + ", ".join(f"{e.name} {e.last_loss:.4f}" for e in entries))
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in env['loadavg_end'])}")
    print(f"total runtime: {env['runtime_s']:.1f} s")
    results = results_json(entries, args, env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
