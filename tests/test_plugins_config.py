"""Plugins register through hooks, checked at registration; configs fail naming the field."""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any, Literal, NamedTuple

import pluggy
import pytest
import torch
from pydantic import Field, ValidationError
from torch import nn

from kfe import (
    KFEOptimizer,
    PluginError,
    Rule,
    RuleConfig,
    config_model,
    hookimpl,
    json_schema,
    load_config,
    load_registry,
)
from tests.conftest import BUILTIN_PLUGINS


class ScaledConfig(RuleConfig):
    name: Literal["scaled"] = "scaled"
    factor: float = Field(2.0, gt=0)
    """Multiply the projected gradient by this."""


class ScaledState(NamedTuple):
    pass


class Scaled(Rule[ScaledConfig]):
    name = "scaled"
    Config = ScaledConfig
    State = ScaledState

    def update(self, grad, state, ctx):
        return grad * self.config.factor, state


class ScaledPlugin:
    @hookimpl
    def kfe_rules(self):
        return [Scaled]


def test_builtins_load_from_entry_points() -> None:
    registry = load_registry()  # the installed `kfe` entry-point group
    assert {"ekfac", "kfac", "sgd"} <= set(registry.rules)
    assert {nn.Linear, nn.Conv2d} <= set(registry.adapters)


def test_a_distribution_on_sys_path_is_found(tmp_path, monkeypatch) -> None:
    (tmp_path / "kfe_demo_rule.py").write_text(
        textwrap.dedent("""
        from typing import Literal, NamedTuple
        from kfe import Rule, RuleConfig, hookimpl

        class HalfConfig(RuleConfig):
            name: Literal["half"] = "half"

        class Half(Rule):
            name = "half"
            Config = HalfConfig
            State = NamedTuple("HalfState", [])

            def update(self, grad, state, ctx):
                return grad / 2, state

        @hookimpl
        def kfe_rules():
            return [Half]
    """)
    )
    info = tmp_path / "kfe_demo_rule-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kfe-demo-rule\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kfe]\nhalf = kfe_demo_rule\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry()
    assert "half" in registry.rules
    assert "half" in json.dumps(json_schema(registry))
    model = nn.Linear(3, 2)
    KFEOptimizer(model, rule="half", registry=registry)
    sys.modules.pop("kfe_demo_rule", None)


def test_third_party_rule_appears_in_validation_and_schema() -> None:
    registry = load_registry([*BUILTIN_PLUGINS, ScaledPlugin()])
    schema = json.dumps(json_schema(registry))
    assert "scaled" in schema and "Multiply the projected gradient" in schema
    cfg = load_config({"rule": {"name": "scaled", "factor": 3.0}}, registry)
    assert cfg.rule_config.factor == 3.0
    with pytest.raises(ValidationError, match="factor"):
        load_config({"rule": {"name": "scaled", "factor": -1}}, registry)
    model = nn.Linear(3, 2)
    before = model.weight.clone()
    opt = KFEOptimizer(model, rule={"name": "scaled", "factor": 3.0}, lr=1.0, registry=registry)
    model(torch.randn(4, 3)).sum().backward()
    grad = model.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.weight, before - 3.0 * grad, atol=1e-5, rtol=1e-5)


def test_wrong_hook_signature_rejected_at_registration() -> None:
    class Bad:
        @hookimpl
        def kfe_rules(self, unexpected):
            return []

    with pytest.raises(pluggy.PluginValidationError, match="unexpected"):
        load_registry([*BUILTIN_PLUGINS, Bad()])


def test_unknown_kfe_hook_rejected() -> None:
    class Typo:
        @hookimpl
        def kfe_rulez(self):
            return []

    with pytest.raises(pluggy.PluginValidationError, match="kfe_rulez"):
        load_registry([*BUILTIN_PLUGINS, Typo()])


@pytest.mark.parametrize(
    ("returned", "match"),
    [([object], "not a Rule subclass"), ([Scaled, Scaled], "already registered")],
)
def test_bad_hook_results_rejected(returned: list[Any], match: str) -> None:
    class Plugin:
        @hookimpl
        def kfe_rules(self):
            return returned

    with pytest.raises(PluginError, match=match):
        load_registry([*BUILTIN_PLUGINS, Plugin()])


def test_rule_tag_must_match_name() -> None:
    class Wrong(Scaled):
        name = "other"

    class Plugin:
        @hookimpl
        def kfe_rules(self):
            return [Wrong]

    with pytest.raises(PluginError, match="Literal"):
        load_registry([Plugin()])


def test_unknown_rule_lists_registered(registry) -> None:
    with pytest.raises(
        ValidationError,
        match="unknown rule 'adamw'; registered rules: adam, ekfac, kfac, rmsprop, sgd, signsgd",
    ):
        KFEOptimizer(nn.Linear(2, 2), rule="adamw", registry=registry)


@pytest.mark.parametrize("field", ["lr", "damping", "weight_decay"])
def test_negative_hyperparameter_names_field(registry, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        KFEOptimizer(nn.Linear(2, 2), registry=registry, **{field: -1.0})
    assert err.value.errors()[0]["loc"] == (field,)
    assert "greater than or equal to 0" in str(err.value)


def test_unknown_field_and_bad_choice(registry) -> None:
    with pytest.raises(ValidationError, match="basis_evry"):
        KFEOptimizer(nn.Linear(2, 2), registry=registry, basis_evry=3)
    with pytest.raises(ValidationError, match="'batch' or 'ema'"):
        KFEOptimizer(nn.Linear(2, 2), registry=registry, rule={"name": "ekfac", "estimator": "x"})
    with pytest.raises(ValidationError, match="fallback: rule 'ekfac' needs"):
        KFEOptimizer(nn.Linear(2, 2), registry=registry, fallback="ekfac")


def test_model_without_supported_layer_fails_clearly(registry) -> None:
    with pytest.raises(ValueError, match="no trainable layer of a supported type"):
        KFEOptimizer(nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3)), registry=registry)


def test_config_is_frozen_and_loads_from_files(registry, tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("rule:\n  name: kfac\n  damping_mode: split\nlr: 0.5\n")
    (tmp_path / "c.json").write_text(json.dumps({"rule": "ekfac", "damping": 0.1}))
    cfg = load_config(tmp_path / "c.yaml", registry)
    assert cfg.rule_config.name == "kfac" and cfg.lr == 0.5
    assert load_config(tmp_path / "c.json", registry).damping == 0.1
    with pytest.raises(ValidationError):
        cfg.lr = 1.0  # type: ignore[misc]
    opt = KFEOptimizer(nn.Linear(2, 2), cfg, registry=registry, damping=0.2)
    assert opt.param_groups[0]["damping"] == 0.2 and opt.param_groups[0]["lr"] == 0.5
    assert config_model(registry) is config_model(registry)
    # a path goes straight to the constructor, str or Path; keywords still override it
    for path in (tmp_path / "c.yaml", str(tmp_path / "c.yaml")):
        opt = KFEOptimizer(nn.Linear(2, 2), path, registry=registry, momentum=0.9)
        assert (
            opt.config.rule_config.name == "kfac" and opt.config.rule_config.damping_mode == "split"
        )
        assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9


def test_yaml_boolean_true_reads_as_the_true_fisher(registry, tmp_path) -> None:
    """``fisher: true`` unquoted is a YAML boolean; it means the true Fisher, while
    ``false`` is no Fisher kind and is refused naming the field and its values."""
    (tmp_path / "t.yaml").write_text("fisher: true\n")
    (tmp_path / "f.yaml").write_text("fisher: false\n")
    assert load_config(tmp_path / "t.yaml", registry).fisher == "true"
    with pytest.raises(ValidationError, match="fisher\n  Input should be 'empirical' or 'true'"):
        load_config(tmp_path / "f.yaml", registry)
