"""Where ``ekfac`` batch's step time goes, without the profiler, and its matmul floor.

One process, the step-time benchmark's model and settings (auto-encoder
784-1000-500-250-30-250-500-1000-784, batch 1000, ``factor_every=10``,
``basis_every=100``, Lambda every step, momentum 0.9) and torch Adam on a twin model,
stepped alternately on the same synthetic batches. Per step it times forward + backward
(capture on), the optimizer step (plain steps and factor steps apart) and Adam's whole
step; after each plain step it replays the matmuls that step runs, with the same shapes
(per layer, sides padded to multiples of 8 as kfe pads them):

- ``x U_A`` (``n x p_A x p_A``) and ``g U_B`` (``n x d_out x p_B``), the rotated captures;
- the product of their squares and their product, Lambda and the projected gradient
  (each ``p_B x n x p_A``);
- the unprojection ``U_B (M U_A^T)`` (``d_out x (d_in + 1) x p_A`` and
  ``p_B x d_out x p_A``).

Printed: medians in ms, the ratio to Adam without the refresh (amortized factor steps
included) and the matmul floor ``(forward + backward + matmuls) / Adam``. Wall-clock
numbers for reading, not for tests (``--quick`` is a smoke run).

    python benchmarks/step_floor.py --json floor.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # the same model and loss as the step-time benchmark

import kfe
from kfe.basis import PAD_MULTIPLE

FULL_DIMS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def _pad(d: int) -> int:
    return d + (-d) % PAD_MULTIPLE


def matmul_replay(dims: tuple[int, ...], n: int) -> Callable[[], None]:
    """The matmuls of one plain ``ekfac`` batch step on layers ``dims`` at batch ``n``."""
    ops = []
    for d_in, d_out in itertools.pairwise(dims):
        cols = d_in + 1  # the bias coordinate
        p_A, p_B = _pad(cols), _pad(d_out)
        ops.append(
            (
                torch.randn(n, p_A),  # x, augmented and padded
                torch.randn(n, d_out),  # g
                torch.randn(p_A, p_A),  # U_A, padded
                torch.randn(p_B, p_B),  # U_B, padded
                torch.randn(d_out, cols),  # the rule's output M
            )
        )

    def run() -> None:
        for x, g, U_A, U_B, M in ops:
            rx = x @ U_A
            rg = g @ U_B[: g.shape[1]]
            torch.addmm(rg.new_empty(rg.shape[1], rx.shape[1]), rg.mT, rx, beta=0)
            torch.addmm(rg.new_empty(rg.shape[1], rx.shape[1]), rg.mT, rx, beta=0)
            U_B[:, : M.shape[0]] @ (M @ U_A.mT[: M.shape[1]])

    return run


def measure(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = step_time.autoencoder(args.dims)
    twin = copy.deepcopy(model)
    opt = kfe.KFEOptimizer(
        model,
        rule={"name": "ekfac", "estimator": "batch"},
        lambda_every=1,
        lr=1e-3,
        damping=1e-3,
        momentum=0.9,
        factor_every=args.factor_every,
        basis_every=args.basis_every,
    )
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3)
    batches = [torch.rand(args.batch, args.dims[0]) for _ in range(4)]
    replay = matmul_replay(args.dims, args.batch)
    clock = time.perf_counter
    fb: list[float] = []
    plain: list[float] = []
    factor: list[float] = []
    gemm: list[float] = []
    adam_total: list[float] = []
    for i in range(args.warmup + args.steps):
        x = batches[i % len(batches)]
        refresh = i % args.basis_every == 0
        t0 = clock()
        step_time.loss_fn(model, x).backward()
        t1 = clock()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = clock()
        step_time.loss_fn(twin, x).backward()
        adam.step()
        adam.zero_grad(set_to_none=True)
        t3 = clock()
        replayed = 0.0
        if i % args.factor_every:
            start = clock()
            replay()
            replayed = clock() - start
        if i < args.warmup or refresh:
            continue
        fb.append(t1 - t0)
        adam_total.append(t3 - t2)
        if i % args.factor_every:
            plain.append(t2 - t1)
            gemm.append(replayed)
        else:
            factor.append(t2 - t1)
    ms = {
        "forward_backward": statistics.median(fb) * 1e3,
        "plain_step": statistics.median(plain) * 1e3,
        "factor_step": statistics.median(factor) * 1e3 if factor else float("nan"),
        "matmuls": statistics.median(gemm) * 1e3,
        "adam": statistics.median(adam_total) * 1e3,
    }
    share = 1 / args.factor_every
    step = (1 - share) * ms["plain_step"] + share * ms["factor_step"]
    ms["ratio_without_refresh"] = (ms["forward_backward"] + step) / ms["adam"]
    ms["matmul_floor"] = (ms["forward_backward"] + ms["matmuls"]) / ms["adam"]
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps (50)")
    p.add_argument("--warmup", type=int, default=11, help="untimed steps first (11)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--factor-every", type=int, default=10)
    p.add_argument("--basis-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="smoke run: small model, few steps")
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args(argv)
    args.dims = FULL_DIMS
    if args.quick:
        args.dims, args.batch, args.steps, args.warmup = (20, 16, 8, 16, 20), 32, 8, 3
        args.factor_every, args.basis_every = 2, 6
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = measure(args)
    print(f"model {'-'.join(map(str, args.dims))}, batch {args.batch}, {args.steps} steps")
    for key, value in ms.items():
        print(f"  {key:22s} {value:8.3f}{'' if 'ratio' in key or 'floor' in key else ' ms'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"settings": vars(args) | {"json": str(args.json)}, "ms_and_ratios": ms},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
