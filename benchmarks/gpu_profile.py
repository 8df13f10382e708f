"""Per-phase profile of the MNIST auto-encoder under EKFAC and Adam (GPU when there is one).

Model: ``Linear`` layers 784-1000-500-250-30-250-500-1000-784 with ``tanh`` after every
layer except the 30-unit code layer and the output (the auto-encoder of Hinton &
Salakhutdinov, 2006, the benchmark of Martens & Grosse, 2015 and George et al., 2018);
batch 1000 of synthetic pixels ``torch.rand`` in [0, 1]; loss
``binary_cross_entropy_with_logits`` summed over the 784 pixels, averaged over the batch.

Optimizers, each on its own copy of the same initial model:

- ``ekfac``: ``kfe.KFEOptimizer(rule="ekfac")`` with the library's default cadences
  (factors and Lambda every 10 steps, basis every 100);
- ``kfe-adam``: ``kfe.KFEOptimizer(rule="adam", basis="identity")`` (the pipeline's
  overhead around Adam: no capture, no rotation);
- ``torch-adam``: ``torch.optim.Adam``, the baseline.

Each is profiled with :func:`kfe.profiling.profile_steps` (schedule wait 1, warmup 1,
active ``--active``) after ``--warmup-steps`` untimed steps. For KFE optimizers the step
counter is then fast-forwarded through ``state_dict`` / ``load_state_dict`` so that the
first active step is a basis refresh: the window of ``--active`` (default 10) steps holds
one refresh, one factor update and one Lambda update, and its per-step means are printed
(multiply the ``kfe/eigh`` row by ``active / basis_every`` for its amortized share).
On CUDA the phase times are the kernel times attributed to each range (device
timeline); on CPU, host times. Traces go to ``--out/<optimizer>`` (open with
``tensorboard --logdir OUT``, ``pip install 'kfe[profile]'``).

    python benchmarks/gpu_profile.py                     # full size, CUDA if available
    python benchmarks/gpu_profile.py --quick --device cpu  # tiny smoke run (tests)
    python benchmarks/gpu_profile.py --json profile.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kfe
from kfe.profiling import PHASES, PhaseTable, profile_steps

FULL_DIMS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_DIMS = (32, 16, 8, 4, 8, 16, 32)


def autoencoder(dims: tuple[int, ...], code_index: int) -> nn.Sequential:
    """``Linear`` layers, ``tanh`` after each but the code layer and the output."""
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i != last and i + 1 != code_index:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def loss_fn(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and batch (smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1000; 32 quick)")
    p.add_argument("--active", type=int, default=None, help="profiled steps (default 10; 3)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    p.add_argument("--factor-every", type=int, default=None, help="default 10 (1 quick)")
    p.add_argument("--lambda-every", type=int, default=None, help="default 10 (1 quick)")
    p.add_argument("--basis-every", type=int, default=None, help="default 100 (2 quick)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_profile"), help="trace folder")
    p.add_argument("--json", type=Path, default=None, help="write every table as JSON")
    p.add_argument("--no-memory", action="store_true", help="do not record allocations")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "batch": 32 if quick else 1000,
        "active": 3 if quick else 10,
        "factor_every": 1 if quick else 10,
        "lambda_every": 1 if quick else 10,
        "basis_every": 2 if quick else 100,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def fast_forward(opt: kfe.KFEOptimizer, step: int) -> None:
    """Set the step counter (cadences depend only on it) through the public state dict."""
    state = opt.state_dict()
    state["kfe"]["step"] = step
    opt.load_state_dict(state)


def profile_one(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> PhaseTable:
    def step(i: int) -> None:
        x = batches[i % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), x).backward()
        opt.step()

    for i in range(args.warmup_steps):
        step(i)
    wait, warmup = 1, 1
    if isinstance(opt, kfe.KFEOptimizer):
        # the first active step is a refresh step (step % basis_every == 0)
        first = opt.steps_taken + wait + warmup
        target = args.basis_every * -(-first // args.basis_every)
        fast_forward(opt, target - wait - warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return profile_steps(
        step,
        args.out / name,
        wait=wait,
        warmup=warmup,
        active=args.active,
        device=device,
        record_memory=not args.no_memory,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)} (torch {torch.__version__})")
    else:
        why = "requested" if args.device else "no CUDA device available"
        print(f"CPU run ({why}): host times, {platform.processor() or platform.machine()}")
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    code_index = dims.index(min(dims))  # the linear code layer's output width
    torch.manual_seed(0)
    base = autoencoder(dims, code_index).to(device)
    batches = [torch.rand(args.batch, dims[0], device=device) for _ in range(2)]
    cadence = {
        "factor_every": args.factor_every,
        "lambda_every": args.lambda_every,
        "basis_every": args.basis_every,
    }
    makers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "ekfac": lambda m: kfe.KFEOptimizer(m, rule="ekfac", lr=1e-3, damping=1e-2, **cadence),
        "kfe-adam": lambda m: kfe.KFEOptimizer(m, rule="adam", basis="identity", lr=1e-3),
        "torch-adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    }
    print(
        f"model {'-'.join(map(str, dims))}, batch {args.batch}, {args.active} profiled steps; "
        f"ekfac cadences {cadence}"
    )
    results: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dims": list(dims),
        "batch": args.batch,
        "tables": {},
    }
    for name, make in makers.items():
        model = copy.deepcopy(base)
        table = profile_one(name, model, make(model), batches, args, device)
        print(f"\n## {name}\n")
        print(table.format())
        if name == "ekfac":
            missing = [p for p in PHASES[:-2] if p not in {r.name for r in table.rows}]
            if missing:
                print(f"note: phases not seen in the window: {missing}")
            eigh = next((r for r in table.rows if r.name == "kfe/eigh"), None)
            if eigh is not None:
                share = eigh.total_ms * args.active / args.basis_every
                print(
                    f"kfe/eigh amortized over basis_every={args.basis_every}: {share:.3f} ms/step"
                )
        results["tables"][name] = table.to_dict()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    print(f"traces: {args.out}/<optimizer> (tensorboard --logdir {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
