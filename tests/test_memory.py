"""Memory: what a step allocates, counted exactly by :func:`kfe.memory.track_allocations`.

The core engine's claims (issue: core engine, "Speed and memory"): Lambda for
``nn.Linear`` never materialises a per-example gradient tensor ``(n, d_out, d_in+1)``;
for layers with several positions per example (sequences, conv patches) the per-example
projected gradients are formed in chunks under ``lambda_chunk_mb``. Sizes are chosen so
that the forbidden tensors would be the largest by far.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kfe import KFEOptimizer
from kfe.memory import track_allocations

MiB = 2**20


def test_tracker_counts_new_storages_until_they_are_freed() -> None:
    before = torch.zeros(100)
    with track_allocations(record_shapes=True) as usage:
        before.add_(1)  # in place on an older tensor: not an allocation
        view = before[10:]  # a view of an older tensor: none either
        a = torch.ones(256)  # 1 KiB
        b = a * 2  # 1 KiB more
        del b  # freed: the peak stays, the live total drops
        c = torch.ones(64)
    assert usage.count == 3
    assert usage.shapes == [((256,), 1024), ((256,), 1024), ((64,), 256)]
    assert usage.peak_bytes == 2048
    assert usage.largest_bytes == 1024 and usage.largest_shape == (256,)
    assert usage.retained_bytes == 1024 + 256  # a and c are alive
    del a, c, view
    assert usage.retained_bytes == 0


def test_tracker_counts_growth_and_skips_meta_and_other_devices() -> None:
    square, grown = torch.ones(64, 64), torch.empty(0)
    with track_allocations() as usage:
        torch.mm(square, square, out=torch.empty(0))  # an out= tensor resized by the op
        grown.resize_(1000)  # an older storage grown: its 4000 new bytes count
        torch.empty(1000, 1000, device="meta")
        torch.empty(0).set_(square.untyped_storage())  # an older storage: nothing new
    assert usage.count == 2  # the mm result in the grown out= tensor, and the growth
    assert usage.largest_bytes == 64 * 64 * 4 and usage.retained_bytes == 4000
    del grown
    assert usage.retained_bytes == 0
    with track_allocations(device="meta") as usage:
        torch.ones(100)
    assert usage.count == 0


def steps(
    model: nn.Module, x: torch.Tensor, **settings: object
) -> Callable[[], list[tuple[tuple[int, ...], int]]]:
    """Runs ``ekfac`` batch (Lambda every step, factors every step, refresh every 2) and
    returns the shapes and bytes of every allocation of four steps (two refreshes)."""
    opt = KFEOptimizer(
        model,
        rule={"name": "ekfac", "estimator": "batch"},
        factor_every=1,
        basis_every=2,
        **settings,  # type: ignore[arg-type]
    )

    def run() -> list[tuple[tuple[int, ...], int]]:
        shapes = []
        for _ in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            with track_allocations(record_shapes=True) as usage:
                opt.step()
            shapes += usage.shapes
        assert opt.steps_taken == 4
        return shapes

    return run


@pytest.mark.parametrize("positions", [None, 1, 4])
def test_linear_lambda_never_forms_per_example_gradients(positions: int | None) -> None:
    """``(n, d)`` inputs and sequences ``(n, T, d)`` on the pairs route (``T <= 4``)."""
    torch.manual_seed(0)
    n, d_in, d_out = 64, 31, 40
    shape = (n, d_in) if positions is None else (n, positions, d_in)
    shapes = steps(nn.Sequential(nn.Linear(d_in, d_out)), torch.randn(shape))()
    per_example = n * d_out * (d_in + 1) * 4  # float32 bytes of (n, d_out, d_in + 1)
    largest = max(size for _, size in shapes)  # the pairs route's (n, 6, d_out) at T = 4
    assert largest <= per_example / 4, max(shapes, key=lambda s: s[1])
    # nor in chunks: no tensor of per-example projected gradients (k, d_out, d_in + 1)
    assert not [s for s, _ in shapes if len(s) == 3 and s[1:] == (d_out, d_in + 1)]


def layer_and_input(kind: str) -> tuple[nn.Module, torch.Tensor, int, int]:
    """A layer with ``T = 16`` or ``64`` positions per example (the examples route), its
    input, and its block ``(d_out, d_in + 1)`` = ``(48, 64)``: per-example gradients of
    the whole batch of 128 would be 1.5 MiB."""
    torch.manual_seed(0)
    if kind == "sequence":
        return nn.Linear(63, 48), torch.randn(128, 16, 63), 48, 64
    conv = nn.Conv2d(7, 48, kernel_size=3, padding=1)  # 7 * 9 + 1 = 64 columns, T = 64
    return nn.Sequential(conv, nn.Flatten()), torch.randn(128, 7, 8, 8), 48, 64


@pytest.mark.parametrize("kind", ["sequence", "conv"])
def test_per_example_chunks_stay_under_lambda_chunk_mb(kind: str) -> None:
    model, x, d_out, d_A = layer_and_input(kind)
    shapes = steps(model, x, lambda_chunk_mb=1)()
    chunks = [(s, size) for s, size in shapes if len(s) == 3 and s[1:] == (d_out, d_A)]
    assert chunks, "no per-example projected gradients were formed (route not taken?)"
    assert max(size for _, size in chunks) <= 1 * MiB
    assert max(s[0] for s, _ in chunks) == MiB // (d_out * d_A * 4)  # as many as fit
    assert all(s[0] < x.shape[0] for s, _ in chunks)  # never the whole batch at once
