"""Step time of the KFE optimizers on a conv net (VGG11 without batch norm), against Adam.

The paper's CIFAR models have many positions per example (conv patches), where Lambda
of ``ekfac`` must sum each example's gradient over its positions before squaring
(``kfe.statistics``). This runs torch Adam, ``kfac``, ``ekfac`` (ema) and ``ekfac``
(batch, Lambda every step) round-robin on twin models, synthetic 32x32 RGB batches,
``factor_every=10``, ``basis_every=100`` (the refresh of step 0 is in the warm-up, so the
times are plain and factor steps, no refresh), and prints the median time per step
(forward + backward + step), the step alone, and the ratio to Adam.

``--examples-route`` and ``--lambda-chunk-mb`` put back the Lambda of before the eighth
session (every ``T > 1`` through per-example tensors, 64 MiB chunks) for a side-by-side
comparison. Wall-clock numbers for reading, not for tests (``--quick`` is a smoke run).

    python benchmarks/conv_step.py --json conv.json
    python benchmarks/conv_step.py --examples-route --lambda-chunk-mb 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kfe
import kfe.statistics
from kfe.models import build_model

KFE_RULES: dict[str, Any] = {
    "kfac": "kfac",
    "ekfac": "ekfac",
    "ekfac-batch": {"name": "ekfac", "estimator": "batch"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.5, help="VGG11 width multiplier (0.5)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps (30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    p.add_argument("--lambda-chunk-mb", type=int, default=None, help="kfe's lambda_chunk_mb")
    p.add_argument(
        "--examples-route", action="store_true", help="Lambda never takes the pairs route"
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument(
        "--matmul-dtype",
        choices=("bfloat16", "float16"),
        help="kfe's matmul_dtype (default: the parameters' float32; docs/precision.md)",
    )
    p.add_argument(
        "--fp32-matmul-precision",
        choices=("ieee", "bf16", "tf32"),
        help="kfe's fp32_matmul_precision (default: the process's; docs/precision.md)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args()
    if args.quick:
        args.width, args.batch, args.steps, args.warmup = 0.125, 8, 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.examples_route:
        kfe.statistics.PAIRS_MAX_POSITIONS = 1  # T = 1 only: as before the pairs route
        kfe.statistics.PAIRS_SMALL_BLOCK = 0

    torch.manual_seed(0)
    base = build_model({"name": "vgg11", "width": args.width}, (3, 32, 32), 10)
    data = [
        (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))) for _ in range(2)
    ]
    extra: dict[str, object] = {
        "matmul_dtype": args.matmul_dtype,
        "fp32_matmul_precision": args.fp32_matmul_precision,
    }
    if args.lambda_chunk_mb is not None:
        extra["lambda_chunk_mb"] = args.lambda_chunk_mb
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    model = copy.deepcopy(base)
    runs["adam"] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    for name, rule in KFE_RULES.items():
        model = copy.deepcopy(base)
        lam = {"lambda_every": 1} if name == "ekfac-batch" else {}
        opt = kfe.KFEOptimizer(
            model, rule=rule, lr=1e-3, damping=1e-3, momentum=0.9, **lam, **extra
        )
        runs[name] = (model, opt)

    totals: dict[str, list[float]] = {k: [] for k in runs}
    steps: dict[str, list[float]] = {k: [] for k in runs}
    loss_fn = nn.CrossEntropyLoss()
    for i in range(args.warmup + args.steps):
        x, y = data[i % 2]
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            loss_fn(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t2 = time.perf_counter()
            if i >= args.warmup:
                totals[name].append(t2 - t0)
                steps[name].append(t2 - t1)

    adam = statistics.median(totals["adam"])
    print(f"VGG11 width {args.width}, batch {args.batch}, {args.steps} steps, 32x32 inputs")
    print(f"{'optimizer':12s} {'ms/step':>9s} {'step ms':>9s} {'x Adam':>7s}")
    result: dict[str, dict[str, float]] = {}
    for name in runs:
        total, step = statistics.median(totals[name]), statistics.median(steps[name])
        result[name] = {"ms": 1e3 * total, "step_ms": 1e3 * step, "x_adam": total / adam}
        print(f"{name:12s} {1e3 * total:9.1f} {1e3 * step:9.1f} {total / adam:7.2f}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "results": result}, indent=2))


if __name__ == "__main__":
    main()
