"""The deep auto-encoder of Hinton & Salakhutdinov (2006), the K-FAC/EKFAC benchmark.

Encoder ``d-1000-500-250-30`` and the mirrored decoder ``30-250-500-1000-d`` (``d`` the
flattened input size, 784 on MNIST), every layer an ``nn.Linear`` with bias, a
nonlinearity after every layer except the 30-unit code layer (linear, as in the paper)
and the output layer (whose pre-activations are the logits of a Bernoulli per pixel).
The loss the harness pairs with it is BCE-with-logits against the input, summed over
pixels and averaged over the batch.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from kfe.models.base import Activation, ModelConfig, Task, flat_features, make_activation, scaled

__all__ = ["AutoencoderConfig", "DeepAutoencoder", "sparse_init_"]

SPARSE_CONNECTIONS = 15
"""Non-zero incoming weights per unit in the sparse initialisation (Martens, 2010)."""


class DeepAutoencoder(nn.Module):
    """A fully connected auto-encoder with a linear code layer and logit outputs.

    Args:
        in_features: the flattened input size ``d``.
        hidden: the encoder's layer sizes, the last being the code; the decoder mirrors
            them (``hidden[-2], ..., hidden[0], d``).
        activation: the nonlinearity after every layer but the code and the output.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: Activation) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("DeepAutoencoder needs at least the code layer in `hidden`")
        enc_sizes = (in_features, *hidden)
        dec_sizes = tuple(reversed(enc_sizes))
        self.encoder = self._stack(enc_sizes, activation)
        self.decoder = self._stack(dec_sizes, activation)

    @staticmethod
    def _stack(sizes: tuple[int, ...], activation: Activation) -> nn.Sequential:
        """Linear layers through ``sizes``, with ``activation`` between them (none after
        the last: the code layer is linear, the output layer gives logits)."""
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            if i > 0:
                layers.append(make_activation(activation))
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)

    def encode(self, x: Tensor) -> Tensor:
        """The code ``(N, hidden[-1])`` of a batch ``(N, ...)``."""
        out: Tensor = self.encoder(x.flatten(1))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits with the shape of ``x``."""
        out: Tensor = self.decoder(self.encode(x))
        return out.view(x.shape)


@torch.no_grad()
def sparse_init_(module: nn.Module, connections: int = SPARSE_CONNECTIONS) -> None:
    """Martens' (2010) sparse initialisation of every ``nn.Linear`` in ``module``: each
    unit gets ``connections`` (at most its fan-in) non-zero incoming weights drawn from
    ``N(0, 1)`` at random positions; biases are zero. Draws from torch's global RNG."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        d_out, d_in = layer.weight.shape
        k = min(connections, d_in)
        cols = torch.rand(d_out, d_in).argsort(dim=1)[:, :k]
        weight = torch.zeros(d_out, d_in)
        weight.scatter_(1, cols, torch.randn(d_out, k))
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.zero_()


class AutoencoderConfig(ModelConfig):
    """The MNIST deep auto-encoder (Hinton & Salakhutdinov, 2006) used by K-FAC
    (Martens & Grosse, 2015) and EKFAC (George et al., 2018)."""

    name: Literal["autoencoder"] = "autoencoder"
    """Model tag."""

    task: ClassVar[Task] = "reconstruct"

    hidden: tuple[PositiveInt, ...] = Field(default=(1000, 500, 250, 30), min_length=1)
    """Encoder layer sizes; the last is the linear code layer. The decoder mirrors them."""

    activation: Activation = "sigmoid"
    """Nonlinearity after every layer except the code and the output layer. Default: the
    logistic sigmoid of Hinton & Salakhutdinov (2006) and Martens (2010)."""

    width: float = Field(default=1.0, gt=0)
    """Multiplier on every hidden size except the code layer (rounded, at least 1); for
    small test runs."""

    init: Literal["torch", "sparse"] = "torch"
    """``torch``: PyTorch's default ``nn.Linear`` init; ``sparse``: Martens' (2010)
    sparse init (15 non-zero ``N(0, 1)`` incoming weights per unit, zero biases)."""

    def sizes(self) -> tuple[int, ...]:
        """The encoder's layer sizes after ``width`` (the code size is kept)."""
        *body, code = self.hidden
        return (*(scaled(h, self.width) for h in body), code)

    def build(self, input_shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
        """A :class:`DeepAutoencoder` for inputs ``(N, *input_shape)`` (``num_classes``
        is ignored)."""
        model = DeepAutoencoder(
            flat_features(input_shape, self.name), self.sizes(), self.activation
        )
        if self.init == "sparse":
            sparse_init_(model)
        return model
