"""``kfe diagnose``: train a config and sample the curvature approximation errors.

Runs the config's training (its data order, model, optimizer; ``--steps`` caps it) and,
every ``every`` steps, :class:`kfe.diagnostics.CurvatureDiagnostics` compares K-FAC,
EKFAC and the rule's own diagonal with the exact Fisher block of each chosen layer on a
held-out batch (the first ``held_out`` test examples, never trained on). Writes
``OUT/curvature.jsonl`` and the seed paper's plot ``OUT/curvature.png``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from kfe.diagnostics import CurvatureDiagnostics, plot
from kfe.experiment.config import ConfigError, ExperimentConfigBase
from kfe.experiment.setup import LOSS_REDUCTION, build_experiment
from kfe.experiment.train import batches, train_step

__all__ = ["diagnose_experiment"]


def diagnose_experiment(
    config: ExperimentConfigBase,
    out_dir: Path,
    *,
    layers: Sequence[str],
    every: int = 10,
    steps: int | None = None,
    held_out: int = 256,
) -> Path:
    """Train ``config`` for ``steps`` (default: its epochs / ``max_steps``), sampling the
    errors of ``layers`` every ``every`` steps; returns the JSONL path. ``every`` and
    ``steps`` must be at least 1 (a :class:`ConfigError` naming the argument)."""
    for name, value in (("every", every), ("steps", steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be a whole number of steps >= 1, not {value}")
    exp = build_experiment(config)
    opt = exp.kfe
    if opt is None:
        raise ConfigError("optimizer.type: kfe diagnose needs a kfe optimizer, not 'torch'")
    reconstruct = config.model_section.task == "reconstruct"  # bce or mse on the input
    x_val = exp.data.x_test[:held_out]
    y_val: Tensor = x_val if reconstruct else exp.data.y_test[:held_out]
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "curvature.jsonl"
    jsonl.unlink(missing_ok=True)
    try:
        diagnostics = CurvatureDiagnostics(
            opt,
            exp.module,
            lambda out, target: exp.loss(out, target, target),
            (x_val, y_val),
            layers,
            every,
            jsonl,
            config.loss_kind,
            reduction=LOSS_REDUCTION,
            seed=config.seed,
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"--layer: {exc}") from None
    per_epoch = len(exp.data.x_train) // config.data.batch_size
    total = steps if steps is not None else config.max_steps or config.epochs * per_epoch
    stream = itertools.chain.from_iterable(batches(exp, e) for e in itertools.count(1))
    for step, (x, y) in zip(range(total), stream, strict=False):
        train_step(exp, x, y)
        diagnostics.maybe_record(step)
    plot(jsonl, out_dir / "curvature.png")
    print(f"curvature errors: {jsonl} and {out_dir / 'curvature.png'}", file=sys.stderr)
    return jsonl
