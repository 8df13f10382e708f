"""The base of every model config, and the small helpers the models share.

A model config is a frozen pydantic model whose ``name`` is the tag of the experiment
config's discriminated union; :meth:`ModelConfig.build` turns it into an ``nn.Module``
for a given input shape and number of classes.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = [
    "Activation",
    "ModelConfig",
    "Task",
    "check_classes",
    "flat_features",
    "image_shape",
    "make_activation",
    "scaled",
]

Task = Literal["classify", "reconstruct"]
"""What a model's output is for: class logits (cross-entropy against labels) or a
reconstruction of the input as per-pixel logits (Bernoulli log-likelihood)."""

Activation = Literal["relu", "tanh", "sigmoid"]
"""The element-wise nonlinearities the dense models offer."""


class ModelConfig(BaseModel):
    """Base of every model's configuration: frozen, unknown fields rejected.

    Subclasses declare ``name: Literal["mymodel"] = "mymodel"`` (the tag of the
    discriminated union), ``task`` and :meth:`build`; every field carries an attribute
    docstring, which becomes its ``description`` in the JSON Schema.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )

    name: str
    """The model's registered name (the union's tag)."""

    task: ClassVar[Task]
    """``"classify"``: the output is ``(N, num_classes)`` logits; ``"reconstruct"``: the
    output is logits with the input's shape."""

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A freshly initialised module for inputs ``(N, *input_shape)``.

        Parameters are drawn from torch's global generator (seed it before calling for a
        reproducible initialisation); ``build`` never seeds. ``num_classes`` is ignored
        by ``"reconstruct"`` models.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")


def make_activation(name: Activation) -> nn.Module:
    """A fresh module for the nonlinearity ``name``."""
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}")


def scaled(size: int, width: float) -> int:
    """``size * width`` rounded to the nearest integer, at least 1."""
    return max(1, round(size * width))


def _check_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"{model}: input_shape must be non-empty and positive, got {shape}")
    return shape


def flat_features(input_shape: tuple[int, ...], model: str) -> int:
    """The number of input features once an example is flattened."""
    return math.prod(_check_shape(input_shape, model))


def image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``; anything else is refused naming ``model``."""
    shape = _check_shape(input_shape, model)
    if len(shape) != 3:
        raise ValueError(f"{model}: input_shape must be (C, H, W), got {shape}")
    return shape[0], shape[1], shape[2]


def check_classes(num_classes: int, model: str) -> int:
    """``num_classes`` as a positive int; anything else is refused naming ``model``."""
    if int(num_classes) != num_classes or num_classes <= 0:
        raise ValueError(f"{model}: num_classes must be a positive integer, got {num_classes}")
    return int(num_classes)
