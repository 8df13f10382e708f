"""``kfe profile`` and ``kfe train --profile``: a few steps of a run under the profiler.

The steps are the run's own (its data order, model, optimizer), driven through
:func:`kfe.profiling.profile_steps`; the trace opens in TensorBoard's PyTorch profiler
plugin and the per-phase table is printed and written as ``phases.json``/``phases.md``.
Phases that fire on a cadence (``kfe/eigh`` every ``basis_every`` steps) appear only if
a due step falls in the active window: use ``--set optimizer.basis_every=1`` etc. to see
every phase, or profile more steps.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from kfe.experiment.config import ConfigError
from kfe.experiment.setup import Experiment
from kfe.experiment.train import batches, train_step
from kfe.profiling import PhaseTable, profile_steps

__all__ = ["profile_experiment"]


def profile_experiment(
    exp: Experiment, out_dir: Path, steps: int = 3, *, wait: int = 1, warmup: int = 1
) -> PhaseTable:
    """Profile ``steps`` active steps (after ``wait`` + ``warmup``) of ``exp``'s training.

    ``steps`` must be at least 1 and ``wait``/``warmup`` at least 0 (a :class:`ConfigError`
    naming the argument, raised before anything runs or is written).
    """
    for name, value, least in (("steps", steps, 1), ("wait", wait, 0), ("warmup", warmup, 0)):
        if value < least:
            raise ConfigError(f"{name}: must be a whole number of steps >= {least}, not {value}")
    stream = itertools.chain.from_iterable(batches(exp, epoch) for epoch in itertools.count(1))

    def step(i: int) -> None:
        x, y = next(stream)
        train_step(exp, x, y)

    table = profile_steps(step, out_dir, wait=wait, warmup=warmup, active=steps, device=exp.device)
    if exp.is_main:
        text = table.format()
        (out_dir / "phases.md").write_text(text + "\n")
        table.to_json(out_dir / "phases.json")
        print(text)
        print(
            f"trace: {out_dir} (tensorboard --logdir {out_dir}, with torch-tb-profiler)",
            file=sys.stderr,
        )
    return table
