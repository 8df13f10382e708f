"""Profile a few training steps and break each step down by ``kfe/*`` phase.

The optimizer runs each phase of a step inside a ``torch.profiler.record_function``
range (``kfe/capture``, ``kfe/factors``, ``kfe/eigh``, ``kfe/lambda``, ``kfe/project``,
``kfe/rule``, ``kfe/unproject``, ``kfe/rotate``, ``kfe/fallback``; ``kfe/comm`` in
distributed runs).
:func:`profile_steps` runs a user step function under ``torch.profiler.profile`` with a
schedule, writes a trace that TensorBoard's PyTorch profiler plugin opens
(``pip install 'kfe[profile]'``, then ``tensorboard --logdir OUT_DIR``), and returns a
:class:`PhaseTable`: that plugin's tables drop user ranges, this one is made of them.

Example, from a loop that has a model, an optimizer, a loss and batches::

    def step(i):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    table = kfe.profiling.profile_steps(step, Path("runs/profile"), active=5)
    print(table.format())

How time is attributed (no interval is counted twice). The profiler records a tree of
host events per thread (a range contains the ops it launches). Every host event ``e``
contributes its *own* time ``c(e)``:

- host timeline (CPU runs): ``c(e)`` is ``e``'s self time (its duration minus its
  children's), so ``sum_e c(e)`` over a step's tree is the step's duration exactly;
- device timeline (CUDA runs): ``c(e)`` is the duration of the kernels (and copies) that
  ``e`` itself launched, as the profiler correlates them (the ``device_time`` of a range
  is the sum of ``c`` over it and everything nested in it).

Each event belongs to the step whose ``ProfilerStep#N`` range contains it (events on
other threads, such as CUDA backward ops, by their start time) and to the *nearest*
enclosing ``kfe/*`` range, if any. Then per step, for phase ``P``:

.. math::

    \\mathrm{self}(P) = \\sum_{e:\\ \\text{nearest kfe range is } P} c(e), \\qquad
    \\mathrm{total}(P) = \\sum_{e:\\ \\text{some enclosing range is } P} c(e),

    \\text{step} \\approx \\sum_P \\mathrm{self}(P) + \\text{remainder},

the remainder being ``sum c(e)`` over events in no ``kfe/*`` range (split into the part
inside ``Optimizer.step`` and the rest: forward, backward, data, Python). ``total``
includes phases nested in ``P`` (``kfe/capture`` nests in itself under the true Fisher;
counted once), so totals may not be summed; self times may. On the host timeline the
step is measured independently, as the mean ``ProfilerStep#N`` duration, and
:attr:`PhaseTable.closure_error` (``|sum self + remainder - step| / step``) checks the
accounting (events on other threads overlapping the main one would break it); the tests
hold it within :data:`CLOSURE_TOLERANCE`. On the device timeline the step is the kernel
time of the step (busy time, idle gaps excluded) and the partition is exact by
construction; :attr:`PhaseTable.unlinked_ms` reports device activity the profiler could
not correlate with a host op (not in any row).

Nothing here touches the training hot path: ranges cost a check of a flag when no
profiler runs (measured in ``docs/profiling.md``) and the analysis reads the profiler's
events after each trace is written.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

__all__ = [
    "CLOSURE_TOLERANCE",
    "PHASES",
    "PhaseRow",
    "PhaseTable",
    "phase",
    "phase_table",
    "profile_steps",
]

PHASES = (
    "kfe/capture",
    "kfe/factors",
    "kfe/eigh",
    "kfe/lambda",
    "kfe/project",
    "kfe/rule",
    "kfe/unproject",
    "kfe/rotate",
    "kfe/fallback",
    "kfe/comm",
)
"""The ranges the library opens, in pipeline order (others with the prefix are listed too)."""

CLOSURE_TOLERANCE = 0.05
"""Stated tolerance: on the host timeline, ``sum self + remainder`` is within 5% of the
measured step time (in practice within a few microseconds: the tree partitions the step)."""

_IDLE = contextlib.nullcontext()


def phase(name: str) -> contextlib.AbstractContextManager[Any]:
    """``record_function(name)`` while a profiler runs, else a shared no-op context.

    An entered ``record_function`` costs a dispatcher call even with no profiler (about
    11 us each on the 2-core test machine, see ``docs/profiling.md``); this checks
    ``torch.autograd._profiler_enabled()`` first (about 0.3 us). Any profiler started
    through torch (``torch.profiler.profile``, ``emit_nvtx``) turns it on; a
    ``RecordFunction`` observer registered outside torch's profiler API would not see
    these ranges. The optimizer, the capture hooks and the collectives use it for
    every ``kfe/*`` range.

    Inside a ``torch.compile`` trace (the capture hooks of a compiled model) it is
    always the no-op: a range there would make dynamo recompile the model whenever a
    profiler starts or stops, inside the profiled window.
    """
    if _is_compiling():
        return _IDLE
    return record_function(name) if torch.autograd._profiler_enabled() else _IDLE


def _is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` (torch >= 2.3; earlier: never)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return check is not None and bool(check())


OPTIMIZER_OTHER = "optimizer.step (outside kfe/*)"
REST = "forward/backward/other"

Timeline = Literal["host", "device"]


@dataclass(frozen=True)
class PhaseRow:
    """One ``kfe/*`` phase, per profiled step (means over the active steps).

    Attributes:
        name: the range name, e.g. ``kfe/eigh``.
        self_ms: time whose nearest enclosing ``kfe/*`` range is this one.
        total_ms: time inside this range, nested ``kfe/*`` ranges included.
        share: ``self_ms / step_ms``.
        calls: outermost ranges of this name per step.
    """

    name: str
    self_ms: float
    total_ms: float
    share: float
    calls: float


@dataclass(frozen=True)
class PhaseTable:
    """Per-phase breakdown of the profiled steps (see the module docstring for the math).

    Attributes:
        rows: the ``kfe/*`` phases seen, in pipeline order.
        step_ms: the measured step time (host: ``ProfilerStep#N`` duration; device: kernel
            time of the step).
        optimizer_other_ms: time inside ``Optimizer.step`` but in no ``kfe/*`` range.
        rest_ms: the rest of the un-attributed time (forward, backward, other).
        host_step_ms: the mean ``ProfilerStep#N`` duration (wall clock on the host).
        unlinked_ms: device activity per step not correlated with a host op (device
            timeline only; 0 on the host timeline).
        steps: number of profiled (active) steps the means are over.
        timeline: ``"host"`` or ``"device"``.
        device: the device profiled (``"cpu"`` or the GPU's name).
        trace_dir: where the TensorBoard trace files are.
        trace_files: the trace files written.
    """

    rows: tuple[PhaseRow, ...]
    step_ms: float
    optimizer_other_ms: float
    rest_ms: float
    host_step_ms: float
    unlinked_ms: float
    steps: int
    timeline: Timeline
    device: str
    trace_dir: Path | None = None
    trace_files: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def attributed_ms(self) -> float:
        """Sum of the phases' self times."""
        return sum(r.self_ms for r in self.rows)

    @property
    def remainder_ms(self) -> float:
        """Un-attributed time: ``optimizer_other_ms + rest_ms``."""
        return self.optimizer_other_ms + self.rest_ms

    @property
    def closure_error(self) -> float:
        """``|attributed + remainder - step| / step`` (0 for an empty profile)."""
        if self.step_ms <= 0:
            return 0.0
        return abs(self.attributed_ms + self.remainder_ms - self.step_ms) / self.step_ms

    def row(self, name: str) -> PhaseRow:
        """The row of a phase by name (``KeyError`` listing the phases seen)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no phase {name!r}; seen: {', '.join(r.name for r in self.rows)}")

    def format(self) -> str:
        """A markdown table: one row per phase, the remainder, the step."""

        def share(ms: float) -> str:
            return f"{100 * ms / self.step_ms:.1f}%" if self.step_ms > 0 else "-"

        lines = [
            f"{self.timeline} timeline, {self.device}, mean of {self.steps} profiled steps",
            "",
            "| phase | self ms/step | total ms/step | share | calls/step |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.self_ms:.3f} | {r.total_ms:.3f} | {share(r.self_ms)} "
                f"| {r.calls:g} |"
            )
        for name, ms in ((OPTIMIZER_OTHER, self.optimizer_other_ms), (REST, self.rest_ms)):
            lines.append(f"| {name} | {ms:.3f} | {ms:.3f} | {share(ms)} | |")
        lines.append(f"| **step** | {self.step_ms:.3f} | {self.step_ms:.3f} | 100% | |")
        notes = [
            f"phases + remainder = {self.attributed_ms + self.remainder_ms:.3f} ms "
            f"(closure error {100 * self.closure_error:.2f}%)"
        ]
        if self.timeline == "device":
            notes.append(f"host step {self.host_step_ms:.3f} ms")
            notes.append(f"uncorrelated device activity {self.unlinked_ms:.3f} ms/step")
        lines += ["", "; ".join(notes)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable numbers (paths as strings)."""
        return {
            "timeline": self.timeline,
            "device": self.device,
            "steps": self.steps,
            "step_ms": self.step_ms,
            "host_step_ms": self.host_step_ms,
            "phases": {
                r.name: {
                    "self_ms": r.self_ms,
                    "total_ms": r.total_ms,
                    "share": r.share,
                    "calls": r.calls,
                }
                for r in self.rows
            },
            "optimizer_other_ms": self.optimizer_other_ms,
            "rest_ms": self.rest_ms,
            "remainder_ms": self.remainder_ms,
            "attributed_ms": self.attributed_ms,
            "closure_error": self.closure_error,
            "unlinked_ms": self.unlinked_ms,
            "trace_dir": None if self.trace_dir is None else str(self.trace_dir),
            "trace_files": [str(p) for p in self.trace_files],
        }

    def to_json(self, path: Path) -> None:
        """Write :meth:`to_dict` to ``path``."""
        path.write_text(json.dumps(self.to_dict(), indent=2))


@dataclass
class _Totals:
    """Sums (microseconds) over every analysed cycle; divided by ``steps`` at the end."""

    prefix: str
    self_us: dict[str, float] = field(default_factory=dict)
    total_us: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    optimizer_other_us: float = 0.0
    rest_us: float = 0.0
    host_step_us: float = 0.0
    device_step_us: float = 0.0
    device_all_us: float = 0.0
    device_linked_us: float = 0.0
    steps: int = 0

    def add(self, events: Iterable[Any], timeline: Timeline) -> None:
        """Fold one profiling cycle's ``FunctionEvent`` list in."""
        prefix = self.prefix
        host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
        steps = sorted(
            (e for e in host if e.name.startswith("ProfilerStep")),
            key=lambda e: e.time_range.start,
        )
        if not steps:
            return
        index = {id(s): k for k, s in enumerate(steps)}
        per_step = [0.0] * len(steps)

        def own(e: Any) -> float:
            if timeline == "host":
                return float(e.self_cpu_time_total)
            return float(sum(k.duration for k in e.kernels))

        for e in host:
            chain = []  # e and its ancestors, innermost first
            node = e
            while node is not None:
                chain.append(node)
                node = node.cpu_parent
            root = chain[-1]
            k = index.get(id(root))
            if k is None:  # another thread: the step whose range holds its start
                start = e.time_range.start
                k = next(
                    (
                        j
                        for j, s in enumerate(steps)
                        if s.time_range.start <= start < s.time_range.end
                    ),
                    None,
                )
                if k is None:
                    continue
            names = [n.name for n in chain]
            if e.name.startswith(prefix) and e.name not in names[1:]:
                self.calls[e.name] = self.calls.get(e.name, 0) + 1
            c = own(e)
            if timeline == "device":
                self.device_linked_us += c
            per_step[k] += c
            phases = [n for n in names if n.startswith(prefix)]
            if phases:
                self.self_us[phases[0]] = self.self_us.get(phases[0], 0.0) + c
                for p in set(phases):
                    self.total_us[p] = self.total_us.get(p, 0.0) + c
            elif any(n.startswith("Optimizer.step#") for n in names):
                self.optimizer_other_us += c
            else:
                self.rest_us += c
        self.steps += len(steps)
        self.host_step_us += sum(s.time_range.elapsed_us() for s in steps)
        self.device_step_us += sum(per_step)
        if timeline == "device":
            self.device_all_us += sum(
                e.time_range.elapsed_us()
                for e in events
                if e.device_type != DeviceType.CPU
                and not getattr(e, "is_user_annotation", False)
                and not e.name.startswith((prefix, "ProfilerStep"))
            )

    def table(self, timeline: Timeline, device: str, trace_dir: Path | None) -> PhaseTable:
        n = max(self.steps, 1)
        step_us = self.host_step_us if timeline == "host" else self.device_step_us
        step_ms = step_us / n / 1e3
        known = [p for p in PHASES if p in self.calls or p in self.self_us]
        extra = sorted((set(self.calls) | set(self.self_us)) - set(PHASES))
        rows = []
        for name in known + extra:
            self_ms = self.self_us.get(name, 0.0) / n / 1e3
            rows.append(
                PhaseRow(
                    name=name,
                    self_ms=self_ms,
                    total_ms=self.total_us.get(name, 0.0) / n / 1e3,
                    share=self_ms / step_ms if step_ms > 0 else 0.0,
                    calls=self.calls.get(name, 0) / n,
                )
            )
        files: tuple[Path, ...] = ()
        if trace_dir is not None and trace_dir.is_dir():
            files = tuple(sorted(trace_dir.glob("*.pt.trace.json*")))
        return PhaseTable(
            rows=tuple(rows),
            step_ms=step_ms,
            optimizer_other_ms=self.optimizer_other_us / n / 1e3,
            rest_ms=self.rest_us / n / 1e3,
            host_step_ms=self.host_step_us / n / 1e3,
            unlinked_ms=max(self.device_all_us - self.device_linked_us, 0.0) / n / 1e3,
            steps=self.steps,
            timeline=timeline,
            device=device,
            trace_dir=trace_dir,
            trace_files=files,
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def phase_table(
    events: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    prefix: str = "kfe/",
) -> PhaseTable:
    """The :class:`PhaseTable` of a finished ``torch.profiler.profile``'s ``events()``.

    For a profile you ran yourself (it must have ``ProfilerStep#N`` ranges, i.e. a
    schedule and ``prof.step()`` calls). ``device`` picks the timeline: ``cuda`` reads
    kernel times, anything else host times.
    """
    device = torch.device(device)
    timeline: Timeline = "device" if device.type == "cuda" else "host"
    totals = _Totals(prefix)
    totals.add(events, timeline)
    return totals.table(timeline, _device_name(device), None)


def profile_steps(
    step_fn: Callable[[int], Any],
    out_dir: Path,
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    repeat: int = 1,
    device: torch.device | str = "cpu",
    record_memory: bool = True,
    with_stack: bool = False,
    prefix: str = "kfe/",
) -> PhaseTable:
    """Run ``step_fn(i)`` for ``(wait + warmup + active) * repeat`` steps under the profiler.

    ``step_fn(i)`` does one whole training step (zero_grad, forward, backward,
    ``opt.step()``); ``prof.step()`` is called after each. The schedule is
    ``torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat)``;
    each cycle's trace is written to ``out_dir`` by
    ``torch.profiler.tensorboard_trace_handler`` (open it with ``tensorboard --logdir``
    and the ``torch-tb-profiler`` plugin, the ``profile`` extra) and folded into the
    returned table, whose numbers are means over all ``active * repeat`` steps.

    Args:
        step_fn: one training step, given its index.
        out_dir: trace directory (created).
        wait, warmup, active, repeat: the profiler schedule.
        device: ``cuda`` adds CUDA activity and reads phase times from the device
            (kernel time attributed to each range); otherwise host times.
        record_memory: ``profile_memory`` (allocations per op, the plugin's memory view).
        with_stack: record Python stacks (bigger traces, more overhead).
        prefix: the range-name prefix of the phases.

    Returns:
        The :class:`PhaseTable` (see the module docstring for the attribution).
    """
    device = torch.device(device)
    timeline: Timeline = "device" if device.type == "cuda" else "host"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    write = tensorboard_trace_handler(str(out_dir))
    totals = _Totals(prefix)

    def ready(prof: profile) -> None:
        write(prof)
        totals.add(prof.events(), timeline)

    with warnings.catch_warnings():
        # each cycle's events are read in ``ready``, before the profiler clears them
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end")
        with profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
            on_trace_ready=ready,
            record_shapes=True,
            profile_memory=record_memory,
            with_stack=with_stack,
        ) as prof:
            for i in range((wait + warmup + active) * repeat):
                step_fn(i)
                prof.step()
    return totals.table(timeline, _device_name(device), out_dir)
