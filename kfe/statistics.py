"""Batch statistics from captured ``x`` (``(n, T, d_in[+1])``) and ``g`` (``(n, T, d_out)``).

Scaling convention for weight sharing (``T`` positions per example: sequence tokens,
conv patches), the "expand" convention of Eschenhagen et al. (2023), also used by
curvlinops:

.. math::

    A = \\frac{1}{nT} \\sum_{i,t} x_{i,t} x_{i,t}^\\top, \\qquad
    B = \\frac{1}{n} \\sum_{i,t} g_{i,t} g_{i,t}^\\top ,

so that ``A (x) B`` is exact for ``T = 1`` and equals ``T * E_t[x x^T] (x) E_t[g g^T]``
otherwise. The EKFAC diagonal is the per-example second moment in the KFE,

.. math::

    \\Lambda = \\frac1n \\sum_i \\big(U_B^\\top G_i U_A\\big)^{\\odot 2}, \\qquad
    G_i = \\sum_t g_{i,t} x_{i,t}^\\top .

For ``T = 1`` this is ``(1/n) (g U_B)^{2\\top} (x U_A)^2``: two thin matmuls and one
product of squares, never a ``(n, d_out, d_in)`` tensor. For ``T > 1`` the sum over
``t`` comes before squaring. With ``a = g U_B``, ``b = x U_A``,

.. math::

    \\Lambda_{jk} = \\frac1n \\sum_i \\sum_{t, t'} a_{itj} a_{it'j}\\, b_{itk} b_{it'k}
    = \\frac1n \\Big[ \\sum_{i,t} a_{itj}^2 b_{itk}^2
      + 2 \\sum_i \\sum_{t < t'} (a_{itj} a_{it'j}) (b_{itk} b_{it'k}) \\Big],

one matmul over ``n T (T + 1) / 2`` position pairs (*pairs* route, no per-example
tensor), or per-example projected gradients ``a_i^T b_i`` formed in chunks of the batch
under ``chunk_bytes`` and squared (*examples* route). The pairs route does
``(T + 1) / 2`` times the multiply-adds as one dense matmul; the examples route is bound
by writing and squaring ``n d_out d_in`` entries. On the 2-core CPU the pairs route is
7 - 40x faster at ``T <= 4`` and about 2x at ``T = 8`` on conv-sized blocks, and slower
from ``T = 12`` (``docs/benchmarks.md``), hence :func:`pairs_route`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from kfe.basis import PAD_MULTIPLE

__all__ = ["Moments", "batch_factors", "captures_sum_to", "gram", "kfe_moments"]

DEFAULT_CHUNK_BYTES = 8 * 2**20
GRAM_BLOCK = 384
"""Largest side of the column blocks :func:`gram` splits a wide matrix into (384 against
256: 5% less time over the auto-encoder's factor shapes on the 2-core CPU, as BLAS runs
the larger blocks faster; docs/benchmarks.md, tenth session)."""


def gram(m: Tensor) -> Tensor:
    """``m^T m`` of a ``(k, d)`` matrix, computing each off-diagonal block once.

    The columns are split into ``p = ceil(d / GRAM_BLOCK)`` blocks (multiples of
    :data:`kfe.basis.PAD_MULTIPLE` wide); blocks ``(i, j)`` with ``i <= j`` are
    multiplied straight into the result and ``(j, i)`` is copied as the transpose of
    ``(i, j)``: ``(p + 1) / 2p`` of the flops of one ``mT @ m`` (2/3 for ``p = 3``).
    """
    d = m.shape[-1]
    parts = -(-d // GRAM_BLOCK)
    if parts == 1:
        return m.mT @ m
    width = -(-d // parts)
    width += -width % PAD_MULTIPLE
    spans = [slice(i, min(i + width, d)) for i in range(0, d, width)]
    out = m.new_empty(d, d)
    for i, rows in enumerate(spans):
        for cols in spans[i:]:
            torch.mm(m[:, rows].mT, m[:, cols], out=out[rows, cols])
    for i, rows in enumerate(spans):
        for cols in spans[i + 1 :]:
            out[cols, rows] = out[rows, cols].mT
    return out


def batch_factors(
    pairs: Sequence[tuple[Tensor, Tensor]], d_in: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of one step's captures (several forwards count as one larger batch).

    ``x`` may carry zero padding columns after its first ``d_in`` (the result is cut).
    """
    a_sum: Tensor | None = None
    b_sum: Tensor | None = None
    n_examples = 0
    n_positions = 0
    for x, g in pairs:
        xf = x.reshape(-1, x.shape[-1])
        gf = g.reshape(-1, g.shape[-1])
        a = gram(xf)
        b = gram(gf)
        a_sum = a if a_sum is None else a_sum + a
        b_sum = b if b_sum is None else b_sum + b
        n_examples += x.shape[0]
        n_positions += xf.shape[0]
    assert a_sum is not None and b_sum is not None, "no captures"
    return a_sum[:d_in, :d_in] / n_positions, b_sum / n_examples


class Moments(NamedTuple):
    """The per-example statistics of one step's captures in the KFE."""

    squares: Tensor
    """``E_i[(U_B^T G_i U_A)^2]``."""
    gradient: Tensor | None = None
    """``sum_p U_B^T g_p^T x_p U_A`` (the projected gradient), if asked for."""


PAIRS_MAX_POSITIONS = 8
"""Largest ``T`` for which Lambda takes the pairs route (:func:`pairs_route`)."""
PAIRS_SMALL_BLOCK = 65536
"""``d_out d_in`` under which the pairs route stops at ``T = 4`` (the examples route's
per-example tensors then stay in cache)."""


def pairs_route(positions: int, d_out: int, d_in: int) -> bool:
    """Whether Lambda of a block with ``positions`` per example sums over position pairs
    (one matmul) rather than forming per-example projected gradients (see the module
    doc); ``T = 1`` always takes it."""
    limit = PAIRS_MAX_POSITIONS if d_out * d_in >= PAIRS_SMALL_BLOCK else 4
    return positions <= limit


def kfe_moments(
    pairs: Sequence[tuple[Tensor, Tensor]],
    U_B: Tensor | None,
    U_A: Tensor | None,
    d_in: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    gradient: bool = False,
    example_scales: Sequence[float] | None = None,
) -> Moments:
    """``E_i[(U_B^T G_i U_A)^2]`` over the examples of one step's captures, and with
    ``gradient`` also the projected gradient of the stored ``g`` they add up to,

    .. math::  \\tilde M = \\sum_p (g_p U_B)^\\top (x_p U_A),

    from the same rotated ``x U_A`` and ``g U_B`` (before they are squared): one
    ``d_out x n x d_in`` matmul instead of the two rotations of ``.grad``. It equals
    ``U_B^T .grad U_A`` only when ``.grad`` is exactly the captured sum; the optimizer
    checks that before using it.

    The per-example gradients of pair ``p`` are ``c_p g_p`` with ``c_p`` from
    ``example_scales`` (default 1: ``g`` already per-example; the capture stores the
    mean loss's ``g``, ``c_p = n_p``): ``c_p^2`` rides on the squares' matmul, so ``g`` is
    never copied to rescale it.

    ``U_B``, ``U_A`` may be zero-padded (:func:`kfe.basis.pad_square`), or both ``None``
    for the identity basis; ``x`` may carry zero padding columns after its first
    ``d_in``. The results have the unpadded shape ``(d_out, d_in)``.
    """
    mean = 1 / sum(x.shape[0] for x, _ in pairs)
    d_out = pairs[0][1].shape[-1]
    total: Tensor | None = None
    projected: Tensor | None = None
    for k, (x, g) in enumerate(pairs):
        n, T = x.shape[0], x.shape[1]
        scale = mean * (1.0 if example_scales is None else example_scales[k]) ** 2
        xp, gp = x, g  # (n, T, d_in), (n, T, d_out), padded if the basis is
        rotated = U_A is not None and U_B is not None
        if U_A is not None and U_B is not None:  # (spelt out for the type checker)
            # the zero rows of a padded basis meet no data: multiply by its first rows
            # instead of padding x, g (a copy); the result keeps the padded width
            xp = x @ U_A[: x.shape[-1]]
            gp = g @ U_B[: g.shape[-1]]
        if gradient:
            rows_g, rows_x = gp.reshape(-1, gp.shape[-1]), xp.reshape(-1, xp.shape[-1])
            into = (
                rows_g.new_empty(rows_g.shape[-1], rows_x.shape[-1])
                if projected is None
                else projected
            )
            projected = torch.addmm(into, rows_g.mT, rows_x, beta=0 if k == 0 else 1)
        if pairs_route(T, gp.shape[-1], xp.shape[-1]):
            if T > 1:  # the cross pairs t < t', before any squaring
                i, j = torch.triu_indices(T, T, offset=1, device=x.device)
                if total is None:
                    total = x.new_zeros(gp.shape[-1], xp.shape[-1])
                per_example = len(i) * (gp.shape[-1] + xp.shape[-1]) * x.element_size()
                step = max(1, chunk_bytes // per_example)
                for s in range(0, n, step):
                    gc, xc = gp[s : s + step], xp[s : s + step]
                    a = (gc[:, i] * gc[:, j]).reshape(-1, gc.shape[-1])
                    b = (xc[:, i] * xc[:, j]).reshape(-1, xc.shape[-1])
                    total.addmm_(a.mT, b, alpha=2 * scale)
            # fresh matmul outputs are squared in place; captured tensors are not touched
            xs, gs = (xp.square_(), gp.square_()) if rotated else (xp.square(), gp.square())
            xs, gs = xs.reshape(-1, xs.shape[-1]), gs.reshape(-1, gs.shape[-1])
            # the mean's 1/n rides on the matmul; beta=0 ignores the empty first input
            first = total is None
            into = gs.new_empty(gs.shape[-1], xs.shape[-1]) if total is None else total
            total = torch.addmm(into, gs.mT, xs, beta=0 if first else 1, alpha=scale)
        else:
            per_example = gp.shape[-1] * xp.shape[-1] * x.element_size()
            step = max(1, chunk_bytes // per_example)
            if total is None:
                total = x.new_zeros(gp.shape[-1], xp.shape[-1])
            for s in range(0, n, step):
                proj = gp[s : s + step].mT @ xp[s : s + step]  # (chunk, d_out, d_in)
                total.add_(proj.square_().sum(0), alpha=scale)
    assert total is not None, "no captures"
    cut = None if projected is None else projected[:d_out, :d_in]
    return Moments(total[:d_out, :d_in], cut)


def captures_sum_to(grad: Tensor, pairs: Sequence[tuple[Tensor, Tensor]], probe: Tensor) -> Tensor:
    """Whether ``grad = sum_p g_p^T x_p`` over the captured pairs, seen along ``probe``
    (a fixed pseudo-random vector ``r``): ``grad r`` equals ``sum_p g_p^T (x_p r)`` to
    ``1e-5`` relative, by three matrix-vector products. A 0-dim bool tensor (no host
    sync); ``x`` may carry padding columns after ``grad``'s width.
    """
    direct = grad @ probe
    captured = sum(
        (
            g.reshape(-1, g.shape[-1]).mT @ (x[..., : grad.shape[1]] @ probe).reshape(-1)
            for x, g in pairs
        ),
        torch.zeros_like(direct),
    )
    return (direct - captured).norm() <= 1e-5 * direct.norm()
