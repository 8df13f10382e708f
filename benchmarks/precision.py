"""Accuracy and speed of kfe's lowered matmuls: ``matmul_dtype`` and ``fp32_matmul_precision``.

Two measurements, printed as tables (docs/precision.md):

1. **Matmuls** on the auto-encoder's KFE shapes (``(d_out x d_out) @ (d_out x d_in)``
   rotations, batch-sized products): median relative error of an entry against float64
   and GFLOP/s, for float32 (``ieee``), float32 under oneDNN's ``bf16`` precision, and
   bfloat16 inputs; plus one single product (inner dimension 1), which shows whether a
   backend keeps float32's precision product by product.
2. **One ``ekfac`` batch step** on the whole auto-encoder (factors from two ``lr=0``
   steps, then a measured step at ``lr=1``), float32 with each setting against the same
   step in float64. ``eigh_dtype="float64"`` everywhere so the bases agree and what
   remains is the matmuls' rounding.

Usage::

    python benchmarks/precision.py            # the auto-encoder at batch 1000
    python benchmarks/precision.py --quick    # smoke run: small shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import autoencoder, loss_fn

import kfe
from kfe.precision import fp32_matmul_precision

DIMS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_DIMS = (64, 48, 32, 8, 32, 48, 64)
SETTINGS: dict[str, dict[str, Any]] = {
    "float32 (ieee)": {},
    "fp32_matmul_precision=bf16": {"fp32_matmul_precision": "bf16"},
    "matmul_dtype=bfloat16": {"matmul_dtype": "bfloat16"},
}


def matmul_modes() -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    def ieee(a: Tensor, b: Tensor) -> Tensor:
        with fp32_matmul_precision("ieee"):
            return a @ b

    def fp32_bf16(a: Tensor, b: Tensor) -> Tensor:
        with fp32_matmul_precision("bf16"):
            return a @ b

    def bf16_inputs(a: Tensor, b: Tensor) -> Tensor:
        return (a.bfloat16() @ b.bfloat16()).float()

    return {"float32 (ieee)": ieee, "fp32 bf16 (oneDNN)": fp32_bf16, "bfloat16 inputs": bf16_inputs}


def matmul_table(shapes: list[tuple[int, int, int]], repeats: int) -> list[dict[str, Any]]:
    """Per shape and mode: median relative error of an entry against float64, GFLOP/s."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen)
        b = torch.randn(k, n, generator=gen)
        exact = a.double() @ b.double()
        for mode, mm in matmul_modes().items():
            out = mm(a, b)
            rel = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-30)).median().item()
            start = time.perf_counter()
            for _ in range(repeats):
                mm(a, b)
            seconds = (time.perf_counter() - start) / repeats
            rows.append(
                {
                    "shape": [m, k, n],
                    "mode": mode,
                    "median_rel_error": rel,
                    "gflops": 2 * m * k * n / seconds / 1e9,
                }
            )
    return rows


def ekfac_step(
    base: nn.Module, xs: list[Tensor], dtype: torch.dtype, damping: float, **settings: Any
) -> list[Tensor]:
    """The parameter change of the last of ``len(xs)`` ``ekfac`` batch steps (the
    earlier ones at ``lr=0`` build the factors, basis and Lambda)."""
    model = copy.deepcopy(base).to(dtype)
    opt = kfe.KFEOptimizer(
        model,
        rule={"name": "ekfac", "estimator": "batch"},
        lr=0.0,
        damping=damping,
        factor_every=1,
        basis_every=100,
        lambda_every=1,
        eigh_dtype="float64",
        **settings,
    )
    before: list[Tensor] = []
    for i, x in enumerate(xs):
        opt.param_groups[0]["lr"] = 1.0 if i == len(xs) - 1 else 0.0
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.zero_grad()
        loss_fn(model, x.to(dtype)).backward()
        opt.step()
    return [b - p.detach().double() for b, p in zip(before, model.parameters(), strict=True)]


def step_table(dims: tuple[int, ...], batch: int, damping: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base = autoencoder(dims)
    xs = [torch.rand(batch, dims[0]) for _ in range(3)]
    exact = ekfac_step(base, xs, torch.float64, damping)
    rows = []
    for name, settings in SETTINGS.items():
        step = ekfac_step(base, xs, torch.float32, damping, **settings)
        errors = [(d - r).norm() / r.norm() for d, r in zip(step, exact, strict=True)]
        whole = sum((d - r).square().sum() for d, r in zip(step, exact, strict=True))
        norm = sum(r.square().sum() for r in exact)
        rows.append(
            {
                "setting": name,
                "rel_error": float((whole / norm).sqrt()),
                "largest_per_tensor": float(max(errors)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-3, help="of the ekfac step")
    p.add_argument("--repeats", type=int, default=10, help="timed matmuls per shape and mode")
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args(argv)
    dims, batch = (QUICK_DIMS, 64) if args.quick else (DIMS, args.batch)
    big, side = max(dims), dims[1]
    shapes = [(batch, 1, batch), (side, side, dims[0] + 1), (batch, big, side)]
    if args.quick:
        args.repeats, args.damping = 1, 0.1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    matmuls = matmul_table(shapes, args.repeats)
    print("\nmatmuls: median relative error of an entry against float64, GFLOP/s")
    for row in matmuls:
        shape = "x".join(map(str, row["shape"]))
        print(
            f"  {shape:>16}  {row['mode']:<20} {row['median_rel_error']:9.2e} {row['gflops']:8.1f}"
        )
    steps = step_table(dims, batch, args.damping)
    print(
        f"\none ekfac batch step (damping {args.damping}), float32 against float64: "
        "whole update, largest per tensor"
    )
    for row in steps:
        print(f"  {row['setting']:<28} {row['rel_error']:9.2e} {row['largest_per_tensor']:9.2e}")
    result = {
        "dims": list(dims),
        "batch": batch,
        "damping": args.damping,
        "matmuls": matmuls,
        "ekfac_step": steps,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
