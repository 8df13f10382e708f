"""The experiment harness's models: shapes, architectures, configs, and a few kfe steps."""

from __future__ import annotations

import itertools
import typing
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, TypeAdapter, ValidationError
from torch import nn

import kfe
from kfe.models import (
    MODEL_CONFIGS,
    AnyModelConfig,
    AutoencoderConfig,
    DeepAutoencoder,
    MLPConfig,
    ModelConfig,
    ResNet34Config,
    VGG11Config,
    build_model,
    model_config_union,
)
from kfe.models.resnet import BasicBlock

TINY: dict[str, dict[str, Any]] = {
    "autoencoder": {"name": "autoencoder", "width": 0.125},
    "vgg11": {"name": "vgg11", "width": 0.125},
    "resnet34": {"name": "resnet34", "width": 0.125},
    "resnet34-nobn": {"name": "resnet34", "width": 0.125, "batch_norm": False},
    "mlp": {"name": "mlp", "hidden": (32, 16)},
}


def _layers(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_registry_names_and_tasks() -> None:
    assert set(MODEL_CONFIGS) == {"autoencoder", "vgg11", "resnet34", "mlp"}
    for name, cls in MODEL_CONFIGS.items():
        assert cls.model_validate({}).name == name
        assert cls.task in ("classify", "reconstruct")
    assert AutoencoderConfig.task == "reconstruct"
    assert VGG11Config.task == ResNet34Config.task == MLPConfig.task == "classify"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("key", list(TINY))
def test_output_shapes(key: str, shape: tuple[int, int, int]) -> None:
    config = TINY[key]
    model = build_model(config, shape, num_classes=7)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
    if MODEL_CONFIGS[config["name"]].task == "reconstruct":
        assert out.shape == x.shape
    else:
        assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_autoencoder_default_architecture() -> None:
    model = AutoencoderConfig().build((1, 28, 28), num_classes=10)
    assert isinstance(model, DeepAutoencoder)
    sizes = [(m.in_features, m.out_features) for m in _layers(model, nn.Linear)]
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sizes == list(itertools.pairwise(widths))
    assert all(m.bias is not None for m in _layers(model, nn.Linear))
    # The code layer is linear: the encoder ends on it, the decoder starts on a Linear,
    # and the output layer gives logits (no nonlinearity after it either).
    parts: list[nn.Sequential] = [model.encoder, model.decoder]
    for part in parts:
        assert isinstance(part[0], nn.Linear) and isinstance(part[-1], nn.Linear)
        assert [type(m) for m in list(part)[1::2]] == [nn.Sigmoid] * (len(part) // 2)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        code = model.encode(x)
        assert torch.equal(code, model.encoder[-1](model.encoder[:-1](x.flatten(1))))
        assert (code < 0).any()  # no sigmoid after the code layer
        assert torch.equal(model(x), model.decoder(code).view_as(x))


def test_autoencoder_width_keeps_code_and_any_input_size() -> None:
    config = AutoencoderConfig(width=0.125, activation="tanh")
    assert config.sizes() == (125, 62, 31, 30)
    model = config.build((3, 32, 32), num_classes=0)
    linears = _layers(model, nn.Linear)
    assert linears[0].in_features == linears[-1].out_features == 3 * 32 * 32
    assert [type(m) for m in model.modules() if isinstance(m, nn.Tanh)]


def test_autoencoder_sparse_init() -> None:
    model = AutoencoderConfig(init="sparse", width=0.125).build((1, 8, 8), 0)
    for layer in _layers(model, nn.Linear):
        assert isinstance(layer, nn.Linear)
        nonzero = (layer.weight != 0).sum(dim=1)
        assert (nonzero == min(15, layer.in_features)).all()
        assert (layer.bias == 0).all()


def test_resnet34_architecture() -> None:
    model = ResNet34Config().build((3, 32, 32), num_classes=10)
    blocks = _layers(model, BasicBlock)
    convs = _layers(model, nn.Conv2d)
    shortcut_convs = [
        m
        for b in blocks
        if isinstance(b, BasicBlock)
        for m in b.shortcut.modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert len(blocks) == 16
    assert len(shortcut_convs) == 3  # where the stage changes the shape
    assert len(convs) == 1 + 2 * 16 + 3
    assert len(_layers(model, nn.Linear)) == 1
    assert not _layers(model, nn.MaxPool2d)
    assert len(_layers(model, nn.BatchNorm2d)) == len(convs)
    assert all(c.bias is None for c in convs)
    plain = ResNet34Config(batch_norm=False).build((3, 32, 32), num_classes=10)
    assert not _layers(plain, nn.BatchNorm2d)
    assert all(c.bias is not None for c in _layers(plain, nn.Conv2d))


def test_vgg11_architecture() -> None:
    model = VGG11Config().build((3, 32, 32), num_classes=10)
    convs = _layers(model, nn.Conv2d)
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert len(_layers(model, nn.MaxPool2d)) == 5
    assert [(m.in_features, m.out_features) for m in _layers(model, nn.Linear)] == [(512, 10)]
    assert not _layers(model, nn.BatchNorm2d)
    head = VGG11Config(width=0.125, head=(64,)).build((1, 28, 28), num_classes=3)
    linears = _layers(head, nn.Linear)
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 8), (8, 3)]


def test_all_layers_are_plain_conv_or_linear() -> None:
    for key, config in TINY.items():
        model = build_model(config, (3, 32, 32), 10)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                assert m.groups == 1 and m.padding_mode == "zeros", key


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"name": "vgg11", "depth": 3}, "depth"),
        ({"name": "vgg11", "width": 0}, "width"),
        ({"name": "resnet34", "width": -1.0}, "width"),
        ({"name": "resnet34", "batch_norm": "maybe"}, "batch_norm"),
        ({"name": "autoencoder", "hidden": []}, "hidden"),
        ({"name": "autoencoder", "hidden": [1000, 0]}, "hidden"),
        ({"name": "autoencoder", "activation": "gelu"}, "activation"),
        ({"name": "autoencoder", "init": "xavier"}, "init"),
        ({"name": "mlp", "hidden": [-4]}, "hidden"),
        ({"name": "mlp", "activation": "swish"}, "activation"),
        ({"name": "transformer"}, "name"),
        ({"width": 1.0}, "name"),
    ],
)
def test_validation_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        build_model(config, (1, 28, 28), 10)


def test_configs_are_frozen_and_documented() -> None:
    config = VGG11Config()
    with pytest.raises(ValidationError, match="frozen"):
        config.width = 2.0
    for cls in MODEL_CONFIGS.values():
        schema = cls.model_json_schema()
        assert schema["additionalProperties"] is False
        for field, spec in schema["properties"].items():
            assert spec.get("description"), f"{cls.__name__}.{field} has no docstring"


def test_union_and_build_model_accept_mappings_and_objects() -> None:
    class Experiment(BaseModel):
        model: AnyModelConfig

    parsed = Experiment.model_validate({"model": {"name": "resnet34", "batch_norm": False}})
    assert isinstance(parsed.model, ResNet34Config) and parsed.model.batch_norm is False
    assert "discriminator" in Experiment.model_json_schema()["properties"]["model"]
    dynamic = TypeAdapter(model_config_union()).validate_python({"name": "vgg11"})
    assert isinstance(dynamic, VGG11Config)
    assert set(typing.get_args(typing.get_args(AnyModelConfig)[0])) == set(MODEL_CONFIGS.values())
    config = MLPConfig(hidden=(8,))
    a = build_model(config, (1, 4, 4), 3)
    b = build_model({"name": "mlp", "hidden": [8]}, [1, 4, 4], 3)
    assert isinstance(config, ModelConfig)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


@pytest.mark.parametrize(
    ("config", "shape", "message"),
    [
        ({"name": "vgg11"}, (784,), "vgg11: input_shape"),
        ({"name": "resnet34"}, (1, 28), "resnet34: input_shape"),
        ({"name": "mlp"}, (1, 0, 4), "mlp: input_shape"),
    ],
)
def test_bad_input_shape(config: dict[str, Any], shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(config, shape, 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(config, (1, 8, 8), 0)


def test_construction_follows_the_global_seed() -> None:
    torch.manual_seed(3)
    a = build_model(TINY["vgg11"], (1, 8, 8), 2)
    torch.manual_seed(3)
    b = build_model(TINY["vgg11"], (1, 8, 8), 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("key", list(TINY))
def test_trains_with_ekfac(key: str) -> None:
    config = TINY[key]
    shape = (1, 16, 16)
    model = build_model(config, shape, num_classes=4)
    opt = kfe.KFEOptimizer(model, rule="ekfac", lr=1e-2, damping=1e-2)
    n_layers = len(_layers(model, nn.Conv2d)) + len(_layers(model, nn.Linear))
    assert len(opt.blocks) == n_layers
    assert all(b.tracked for b in opt.blocks)
    x, y = torch.rand(4, *shape), torch.randint(0, 4, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()  # before the forward: it drops the captures of an untaken step
        out = model(x)
        if MODEL_CONFIGS[config["name"]].task == "reconstruct":
            # Bernoulli NLL of the pixels: summed over pixels, mean over the batch.
            loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
        else:
            loss = F.cross_entropy(out, y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert opt.steps_taken == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
