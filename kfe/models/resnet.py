"""ResNet34 for small images (He et al., 2016), as in the common CIFAR-10 ResNets.

A 3x3 stride-1 stem convolution (no max-pool), four stages of ``BasicBlock``\\ s
(``[3, 4, 6, 3]`` blocks of 64, 128, 256, 512 channels; stride 2 at the first block of
stages 2-4), global average pooling and one ``Linear``. A shortcut whose shape changes
is a 1x1 stride-``s`` convolution (+ batch norm), option B of the paper.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from kfe.models.base import ModelConfig, Task, check_classes, image_shape, scaled

__all__ = ["RESNET34_BLOCKS", "BasicBlock", "ResNet", "ResNet34Config"]

RESNET34_BLOCKS = (3, 4, 6, 3)
"""``BasicBlock``\\ s per stage."""

RESNET_CHANNELS = (64, 128, 256, 512)
"""Channels per stage at width 1."""


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions.

    Without batch norm the convolutions carry a bias (nothing else would shift them);
    with it they do not (the norm's ``beta`` is the shift).
    """

    def __init__(self, in_channels: int, channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        bias = not batch_norm
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=bias)
        self.bn1 = _norm(channels, batch_norm)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=bias)
        self.bn2 = _norm(channels, batch_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=bias),
                _norm(channels, batch_norm),
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output; spatial size divided by the stride (rounded up)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + self.shortcut(x))
        return result


class ResNet(nn.Module):
    """A CIFAR-style ResNet of :class:`BasicBlock`\\ s."""

    def __init__(
        self,
        in_channels: int,
        blocks: tuple[int, ...],
        channels: tuple[int, ...],
        num_classes: int,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, padding=1, bias=not batch_norm),
            _norm(channels[0], batch_norm),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        current = channels[0]
        for i, (n, c) in enumerate(zip(blocks, channels, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(current, c, stride, batch_norm))
                current = c
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        out: Tensor = self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
        return out


class ResNet34Config(ModelConfig):
    """CIFAR-style ResNet34 (``BasicBlock``, ``[3, 4, 6, 3]``, 3x3 stem, no max-pool)."""

    name: Literal["resnet34"] = "resnet34"
    """Model tag."""

    task: ClassVar[Task] = "classify"

    width: float = Field(default=1.0, gt=0)
    """Multiplier on the stage channels (64, 128, 256, 512), rounded, at least 1."""

    batch_norm: bool = True
    """Batch norm after every convolution. Its parameters have no layer adapter and
    take the optimizer's fallback rule. Without it the convolutions get biases."""

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A :class:`ResNet` for images ``(N, *input_shape)`` with ``input_shape = (C, H, W)``."""
        channels, _, _ = image_shape(input_shape, self.name)
        return ResNet(
            channels,
            RESNET34_BLOCKS,
            tuple(scaled(c, self.width) for c in RESNET_CHANNELS),
            check_classes(num_classes, self.name),
            self.batch_norm,
        )
