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
3. **``kfac`` split's direction** ``(B + d_B I)^-1 G (A + d_A I)^-1`` on every layer
   (factors and gradient from three synthetic batches, float64): by its shortcut (two
   products with the inverse factors) and by the KFE path (four rotations), each with
   bfloat16 operands, and the shortcut in float32 with and without oneDNN's ``bf16``.

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


def _rounded(t: Tensor) -> Tensor:
    return t.bfloat16().double()


def split_directions(
    B_inv: Tensor, G: Tensor, A_inv: Tensor, U_B: Tensor, U_A: Tensor, scale: Tensor
) -> dict[str, Tensor]:
    """``kfac`` split's direction ``B^-1 G A^-1`` four ways: both routes with bfloat16
    operands (products exact, as the backends accumulate wide), and the shortcut in
    float32, plain and under oneDNN's ``bf16`` precision."""
    r = _rounded
    kfe_path = r(r(U_B.mT) @ r(G)) @ r(U_A) / scale
    f32 = [t.float() for t in (B_inv, G, A_inv)]
    with fp32_matmul_precision("bf16"):
        onednn = (f32[0] @ f32[1] @ f32[2]).double()
    with fp32_matmul_precision("ieee"):
        ieee = (f32[0] @ f32[1] @ f32[2]).double()
    return {
        "shortcut, bfloat16 operands": r(r(B_inv) @ r(G)) @ r(A_inv),
        "KFE path, bfloat16 operands": r(r(U_B) @ r(kfe_path)) @ r(U_A.mT),
        "shortcut, float32 (ieee)": ieee,
        "shortcut, float32 under oneDNN bf16": onednn,
    }


def split_table(dims: tuple[int, ...], batch: int, dampings: list[float]) -> list[dict[str, Any]]:
    """Largest relative error over the auto-encoder's layers of ``kfac`` split's direction
    (factors and gradient from three synthetic batches, float64 reference)."""
    torch.manual_seed(0)
    model = autoencoder(dims).double()
    opt = kfe.KFEOptimizer(model, rule="kfac", lr=0.0, factor_every=1, basis_every=100)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, torch.rand(batch, dims[0], dtype=torch.float64)).backward()
        opt.step()
    rows = []
    for damping in dampings:
        worst: dict[str, float] = {}
        for block in opt.blocks:
            layer = kfe.inspect_layer(opt, block.name)
            A, B, basis = layer.A, layer.B, layer.basis
            assert A is not None and B is not None
            W, bias = block.params[0], block.params[1]
            assert W.grad is not None and bias.grad is not None
            G = torch.cat([W.grad, bias.grad[:, None]], 1)
            a, b = basis.a.clamp_min(0), basis.b.clamp_min(0)
            pi = ((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])).sqrt()
            d_A, d_B = pi * damping**0.5, damping**0.5 / pi
            A_inv = basis.U_A @ torch.diag(1 / (a + d_A)) @ basis.U_A.mT
            B_inv = basis.U_B @ torch.diag(1 / (b + d_B)) @ basis.U_B.mT
            exact = B_inv @ G @ A_inv
            scale = torch.outer(b + d_B, a + d_A)
            for name, D in split_directions(B_inv, G, A_inv, basis.U_B, basis.U_A, scale).items():
                err = float((D - exact).norm() / exact.norm())
                worst[name] = max(worst.get(name, 0.0), err)
        rows.append({"damping": damping, "largest_rel_error": worst})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-3, help="of the ekfac step")
    p.add_argument(
        "--split-dampings",
        type=float,
        nargs="+",
        default=[1e-3, 1e-1, 10.0],
        help="dampings of the kfac split comparison",
    )
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
    splits = split_table(dims, batch, args.split_dampings)
    print("\nkfac split's direction: largest relative error over the layers against float64")
    for row in splits:
        for name, err in row["largest_rel_error"].items():
            print(f"  damping {row['damping']:<8g} {name:<38} {err:9.2e}")
    result = {
        "dims": list(dims),
        "batch": batch,
        "damping": args.damping,
        "matmuls": matmuls,
        "ekfac_step": steps,
        "kfac_split": splits,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
