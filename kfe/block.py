"""A block: the unit the optimizer rotates, one weight matrix with its bias column."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kfe.adapter import LayerAdapter
from kfe.basis import PAD_MULTIPLE

__all__ = ["LayerBlock"]


@dataclass(eq=False)
class LayerBlock:
    """One block: a weight and optional bias, seen as ``W_aug`` of ``(d_out, d_in[+1])``.

    A *tracked* block is a layer with an adapter (its ``x`` and ``g`` are captured); an
    untracked block is a bare parameter with at least two dims that a basis source
    covers without hooks (``shampoo``), viewed as ``(shape[0], -1)``.
    """

    name: str
    module: nn.Module | None
    adapter: LayerAdapter | None
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def tracked(self) -> bool:
        return self.adapter is not None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in[+1])``: the shape of :meth:`matrix` (found on meta tensors, so
        an adapter's own :meth:`~kfe.LayerAdapter.weight_matrix` decides it)."""
        weight = torch.empty(self.weight.shape, device="meta")
        bias = None if self.bias is None else torch.empty(self.bias.shape, device="meta")
        d_out, d_in = self.matrix(weight, bias).shape
        return d_out, d_in

    def matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Stack a weight-shaped and a bias-shaped tensor into ``(d_out, d_in[+1])``."""
        if self.adapter is None:
            w = weight.reshape(weight.shape[0], -1)
        else:
            w = self.adapter.weight_matrix(weight)
        return w if bias is None else torch.cat([w, bias.unsqueeze(1)], dim=1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`matrix`: views shaped like :attr:`params`."""
        if self.bias is None:
            return [matrix.reshape(self.weight.shape)]
        return [matrix[:, :-1].reshape(self.weight.shape), matrix[:, -1]]

    def augment(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Append the homogeneous coordinate (a column of ones) when there is a bias, then
        zero columns up to a multiple of :data:`kfe.basis.PAD_MULTIPLE` (one allocation,
        each entry written once; BLAS is slow on odd sizes), in ``dtype`` (default:
        ``x``'s; an input captured under autocast is cast in the same copy). Statistics
        cut the padding off their results."""
        d = x.shape[-1]
        width = d + (self.bias is not None)
        padded = width + (-width) % PAD_MULTIPLE
        if padded == d:
            return x if dtype is None else x.to(dtype)
        out = x.new_empty(*x.shape[:-1], padded, dtype=dtype)  # each entry written once
        out[..., :d] = x
        out[..., d:width] = 1
        out[..., width:] = 0
        return out
