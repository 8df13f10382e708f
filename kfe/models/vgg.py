"""VGG11 without batch norm (Simonyan & Zisserman, 2015, configuration "A"), CIFAR-style.

Eight 3x3 convolutions (padding 1, ReLU) in five stages separated by 2x2 max-pooling,
then global average pooling to ``1x1`` and a linear classifier on the 512 features, as
in the common CIFAR-10 VGG. Pooling uses ``ceil_mode=True`` so that a 28x28 input still
reaches ``1x1`` (28-14-7-4-2-1); on 32x32 (32-16-8-4-2-1) and every other size whose
halvings stay even it is the ordinary floor pooling.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from kfe.models.base import ModelConfig, Task, check_classes, image_shape, scaled

__all__ = ["VGG", "VGG11_LAYERS", "VGG11Config"]

VGG11_LAYERS: tuple[int | Literal["M"], ...] = (
    *(64, "M", 128, "M", 256, 256, "M"),
    *(512, 512, "M", 512, 512, "M"),
)
"""Configuration "A": output channels of each 3x3 conv, ``"M"`` a 2x2 max-pool."""


class VGG(nn.Module):
    """A VGG-style network: ``features`` (convs + pools), global average pooling and a
    ``classifier`` (``Linear`` layers with ReLU between them)."""

    def __init__(
        self,
        in_channels: int,
        layers: tuple[int | Literal["M"], ...],
        head: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = in_channels
        for spec in layers:
            if spec == "M":
                modules.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                modules += [nn.Conv2d(channels, spec, 3, padding=1), nn.ReLU()]
                channels = spec
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        dense: list[nn.Module] = []
        for width in head:
            dense += [nn.Linear(channels, width), nn.ReLU()]
            channels = width
        dense.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*dense)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        out: Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return out


class VGG11Config(ModelConfig):
    """VGG11 without batch norm, with a CIFAR-style head (EKFAC's CIFAR-10 network)."""

    name: Literal["vgg11"] = "vgg11"
    """Model tag."""

    task: ClassVar[Task] = "classify"

    width: float = Field(default=1.0, gt=0)
    """Multiplier on every conv's channels (64..512) and on ``head`` (rounded, at
    least 1); for small test runs."""

    head: tuple[PositiveInt, ...] = ()
    """Hidden sizes of the classifier (``Linear`` + ReLU each) before the final
    ``Linear``; the default ``()`` is one ``Linear(512, num_classes)``."""

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A :class:`VGG` for images ``(N, *input_shape)`` with ``input_shape = (C, H, W)``."""
        channels, _, _ = image_shape(input_shape, self.name)
        layers = tuple(s if s == "M" else scaled(s, self.width) for s in VGG11_LAYERS)
        head = tuple(scaled(h, self.width) for h in self.head)
        return VGG(channels, layers, head, check_classes(num_classes, self.name))
