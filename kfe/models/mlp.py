"""A multi-layer perceptron classifier on flattened inputs."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import PositiveInt
from torch import Tensor, nn

from kfe.models.base import (
    Activation,
    ModelConfig,
    Task,
    check_classes,
    flat_features,
    make_activation,
)

__all__ = ["MLP", "MLPConfig"]


class MLP(nn.Module):
    """``Flatten``, then ``Linear`` + activation per hidden size, then ``Linear`` to the
    classes (no hidden size: multinomial logistic regression)."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...], activation: Activation, num_classes: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = in_features
        for d_out in hidden:
            layers += [nn.Linear(d_in, d_out), make_activation(activation)]
            d_in = d_out
        layers.append(nn.Linear(d_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of inputs ``(N, ...)``."""
        out: Tensor = self.net(x)
        return out


class MLPConfig(ModelConfig):
    """A fully connected classifier: flatten, hidden layers, linear output."""

    name: Literal["mlp"] = "mlp"
    """Model tag."""

    task: ClassVar[Task] = "classify"

    hidden: tuple[PositiveInt, ...] = (256, 128)
    """Hidden layer sizes (``()``: a linear classifier)."""

    activation: Activation = "relu"
    """Nonlinearity after every hidden layer."""

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """An :class:`MLP` for inputs ``(N, *input_shape)``."""
        return MLP(
            flat_features(input_shape, self.name),
            self.hidden,
            self.activation,
            check_classes(num_classes, self.name),
        )
