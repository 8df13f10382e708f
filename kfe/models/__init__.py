"""The models of the experiment harness, each behind a frozen pydantic config.

Usage::

    from kfe.models import build_model
    model = build_model({"name": "vgg11", "width": 0.5}, input_shape=(3, 32, 32),
                        num_classes=10)

:data:`MODEL_CONFIGS` maps each ``name`` to its config class; the experiment config's
``model`` section is the discriminated union of them (:func:`model_config_union`).
See ``docs/models.md`` for the architectures, their defaults and parameter counts.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import Field, TypeAdapter
from torch import nn

from kfe.models.autoencoder import AutoencoderConfig, DeepAutoencoder
from kfe.models.base import Activation, ModelConfig, Task
from kfe.models.mlp import MLP, MLPConfig
from kfe.models.resnet import BasicBlock, ResNet, ResNet34Config
from kfe.models.vgg import VGG, VGG11Config

__all__ = [
    "MLP",
    "MODEL_CONFIGS",
    "VGG",
    "Activation",
    "AnyModelConfig",
    "AutoencoderConfig",
    "BasicBlock",
    "DeepAutoencoder",
    "MLPConfig",
    "ModelConfig",
    "ResNet",
    "ResNet34Config",
    "Task",
    "VGG11Config",
    "build_model",
    "model_config_union",
    "parse_model_config",
]

MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (AutoencoderConfig, VGG11Config, ResNet34Config, MLPConfig)
}
"""Model name -> config class. A config class added here (its ``name`` a ``Literal``
with that default) joins :func:`model_config_union` and :func:`build_model`."""

AnyModelConfig = Annotated[
    AutoencoderConfig | VGG11Config | ResNet34Config | MLPConfig, Field(discriminator="name")
]
"""The built-in models' discriminated union, as a static type for an experiment
config's field (``model: AnyModelConfig``); :func:`model_config_union` also includes
classes added to :data:`MODEL_CONFIGS` at run time."""


def model_config_union() -> Any:
    """The discriminated union (tag ``name``) of the classes in :data:`MODEL_CONFIGS`,
    as an ``Annotated`` type for a pydantic field."""
    members = functools.reduce(operator.or_, MODEL_CONFIGS.values())
    return Annotated[members, Field(discriminator="name")]


def parse_model_config(config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Validate a mapping into its model's config (a ``pydantic.ValidationError`` names
    any bad field, an unknown ``name`` included); a config object is returned as is."""
    if isinstance(config, ModelConfig):
        return config
    parsed: ModelConfig = TypeAdapter(model_config_union()).validate_python(dict(config))
    return parsed


def build_model(
    config: ModelConfig | Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build the model ``config`` describes for inputs ``(N, *input_shape)``.

    Args:
        config: a model config, or a mapping with its ``name`` and fields.
        input_shape: one example's shape, ``(C, H, W)`` for images.
        num_classes: the number of classes (ignored by ``"reconstruct"`` models).
    """
    return parse_model_config(config).build(tuple(input_shape), num_classes)
