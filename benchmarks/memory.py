"""Memory of each optimizer's step on the step-time benchmark's model, against Adam's.

The auto-encoder 784-1000-500-250-30-250-500-1000-784 at batch 1000 (synthetic input;
``benchmarks/step_time.py``'s model, loss and optimizer settings), each optimizer on its
own copy, stepped through two refresh cycles (``factor_every=5``, ``basis_every=10``:
the memory of a step does not depend on the cadence, only on which work it does). Per
optimizer it reports, counted by :func:`kfe.memory.track_allocations` (the tensors the
step's ops return, deterministic; memory a kernel allocates and frees inside itself,
such as BLAS workspaces, is not seen):

- **state**: the bytes held in ``optimizer.state`` after the run (each storage once),
  and as a multiple of the parameters' bytes (Adam: 2);
- **step peak**: the most memory a ``step()`` allocates on top of what existed before it
  (parameters, gradients, captures, state), for plain steps, factor steps and refresh
  steps apart, and the largest of them as a multiple of the parameters' bytes;
- **captures**: what a KFE optimizer holds from the backward to the step (the layer inputs
  ``x``, which autograd would otherwise free after the backward, and the output
  gradients ``g``), at most over the steps;
- **total**: state + captures + the largest step peak, an upper bound on what the
  optimizer adds to the model, its gradients and activations (old tensors a step frees
  are not subtracted), and that as a multiple of Adam's;
- **largest**: the largest single tensor any step allocated, against the per-example
  gradient tensor ``batch x d_out x (d_in + 1)`` of the widest layer, which the Lambda of
  ``nn.Linear`` must never form (3.1 GB here).

The numbers are deterministic (no timing); ``--quick`` runs the small model.

    python benchmarks/memory.py --json memory.json
    python benchmarks/memory.py --suite grid --only adam-shampoo,pto-soap
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # the same model, loss and optimizer settings as the step-time benchmark

import kfe
from kfe.memory import track_allocations

MiB = 2**20


def tensor_bytes(values: Any) -> int:
    """Bytes of the tensors in nested dicts, lists and tuples, each storage counted once."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(values)
    return sum(seen.values())


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``opt.state``, each storage counted once."""
    return tensor_bytes(list(opt.state.values()))


def capture_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the inputs and output gradients a KFE optimizer holds from the backward
    to the step (Linear inputs are the layer's own input tensors, kept alive longer)."""
    if not isinstance(opt, kfe.KFEOptimizer):
        return 0
    held = [(c.inputs, c.grads) for c in opt.capture.captured.values()]
    return tensor_bytes(held)


def step_kind(entry: step_time.Entry, step: int, args: argparse.Namespace) -> str:
    """``refresh``, ``factor`` or ``plain``: the work step ``step`` does (SOAP: its own
    counter refreshes every ``basis_every`` steps and updates its factors every step)."""
    if entry.is_kfe:
        if step % args.basis_every == 0:
            return "refresh"
        return "factor" if step % args.factor_every == 0 else "plain"
    if entry.period and step > 0 and step % entry.period == 0:
        return "refresh"
    return "plain"


def measure(entry: step_time.Entry, batch: torch.Tensor, args: argparse.Namespace) -> dict:
    peaks: dict[str, int] = {}
    largest, largest_shape, captures = 0, (), 0
    for step in range(args.steps):
        entry.opt.zero_grad()
        step_time.loss_fn(entry.model, batch).backward()
        captures = max(captures, capture_bytes(entry.opt))
        with track_allocations() as usage:
            entry.opt.step()
        kind = step_kind(entry, step, args)
        if step >= args.basis_every:  # the first cycle creates the state
            peaks[kind] = max(peaks.get(kind, 0), usage.peak_bytes)
        if usage.largest_bytes > largest:
            largest, largest_shape = usage.largest_bytes, usage.largest_shape
    params = sum(p.numel() * p.element_size() for p in entry.model.parameters())
    return {
        "state_bytes": state_bytes(entry.opt),
        "capture_bytes": captures,
        "param_bytes": params,
        "step_peak_bytes": peaks,
        "largest_bytes": largest,
        "largest_shape": list(largest_shape),
    }


def per_example_bytes(dims: tuple[int, ...], batch: int) -> tuple[int, tuple[int, int, int]]:
    """Bytes and shape of the widest layer's per-example gradient tensor (float32)."""
    shapes = [(batch, d_out, d_in + 1) for d_in, d_out in itertools.pairwise(dims)]
    shape = max(shapes, key=lambda s: s[1] * s[2])
    return 4 * shape[0] * shape[1] * shape[2], shape


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """One row per optimizer: state, captures, step peaks and their sum, in MiB and as
    multiples of the parameters' bytes; the sum also as a multiple of Adam's."""

    def total(r: dict) -> int:
        return r["state_bytes"] + r["capture_bytes"] + max(r["step_peak_bytes"].values())

    ref = results.get(step_time.REFERENCE)
    worst, shape = per_example_bytes(args.dims, args.batch)
    params = next(iter(results.values()))["param_bytes"]
    print(
        f"model {'-'.join(map(str, args.dims))} ({params / MiB:.1f} MiB of parameters), batch "
        f"{args.batch}, factor_every {args.factor_every}, basis_every {args.basis_every}, "
        f"{args.steps} steps (peaks over steps >= {args.basis_every})"
    )
    head = (
        f"{'optimizer':14} {'state MiB':>9} {'x params':>8} | {'captures':>8} | "
        f"{'step peak MiB: plain':>20} {'factor':>7} {'refresh':>8} {'x params':>8} | "
        f"{'total':>6} {'x Adam':>6} | {'largest MiB':>11}  shape"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        peaks = r["step_peak_bytes"]

        def cell(kind: str, width: int, peaks: dict[str, int] = peaks) -> str:
            return f"{peaks[kind] / MiB:{width}.1f}" if kind in peaks else f"{'-':>{width}}"

        ratio = f"{total(r) / total(ref):6.2f}" if ref else f"{'-':>6}"
        print(
            f"{name:14} {r['state_bytes'] / MiB:9.1f} {r['state_bytes'] / params:8.2f} | "
            f"{r['capture_bytes'] / MiB:8.1f} | {cell('plain', 20)} {cell('factor', 7)} "
            f"{cell('refresh', 8)} {max(peaks.values()) / params:8.2f} | "
            f"{total(r) / MiB:6.1f} {ratio} | {r['largest_bytes'] / MiB:11.1f}  "
            f"{tuple(r['largest_shape'])}"
        )
    print(
        f"(x params: in units of the parameters' {params / MiB:.1f} MiB; total = state + "
        f"captures + the largest step peak, an upper bound on what the optimizer adds to the "
        f"model, its gradients and activations; a per-example gradient tensor of the widest "
        f"layer, {shape}, would be {worst / MiB:.0f} MiB)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--suite", choices=("default", "grid"), default="default")
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument("--factor-every", type=int, default=5)
    parser.add_argument("--basis-every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=21, help="steps per optimizer")
    parser.add_argument("--quick", action="store_true", help="small model, batch 64")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps <= args.basis_every:
        parser.error("--steps must exceed --basis-every (the first cycle creates state)")
    bench = ["--suite", args.suite, "--factor-every", str(args.factor_every)]
    bench += ["--basis-every", str(args.basis_every), "--only", args.only]
    if args.quick:
        bench.append("--quick")
    settings = step_time.parse_args(bench)
    settings.factor_every, settings.basis_every = args.factor_every, args.basis_every
    for key in ("dims", "batch", "eigensolver", "seed"):
        setattr(args, key, getattr(settings, key))
    args.settings = settings
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    base = step_time.autoencoder(args.dims)
    batch = torch.rand(args.batch, args.dims[0])
    entries = step_time.build_entries(args.settings, copy.deepcopy(base))
    results = {e.name: measure(e, batch, args) for e in entries}
    report(results, args)
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "kfe": kfe.__version__,
        "torch": torch.__version__,
        "dims": list(args.dims),
        "batch": args.batch,
        "factor_every": args.factor_every,
        "basis_every": args.basis_every,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
