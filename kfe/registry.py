"""The plugin manager: loads rules and layer adapters from plugins, checked at load time.

:func:`load_registry` with no argument registers everything in the ``kfe``
entry-point group (the built-ins included, as a third-party package would be); tests
pass an explicit list of plugin objects so they do not depend on what is installed.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from torch import nn

from kfe import hookspecs
from kfe.adapter import LayerAdapter
from kfe.rule import Rule, RuleConfig

__all__ = ["PluginError", "Registry", "default_registry", "load_registry"]


class PluginError(TypeError):
    """A plugin broke the contract of :mod:`kfe.hookspecs`."""


@dataclass(frozen=True, eq=False)
class Registry:
    """What the loaded plugins provide: rules by name, adapters by module type.

    Compared and hashed by identity, so derived models (:func:`kfe.config.config_model`)
    are cached per registry.
    """

    rules: Mapping[str, type[Rule[Any]]]
    adapters: Mapping[type[nn.Module], LayerAdapter]

    def rule(self, name: str) -> type[Rule[Any]]:
        try:
            return self.rules[name]
        except KeyError:
            raise ValueError(
                f"unknown rule {name!r}; registered rules: {', '.join(sorted(self.rules))}"
            ) from None

    def adapter_for(self, module: nn.Module) -> LayerAdapter | None:
        """The adapter of the most specific registered base class of ``module``."""
        for cls in type(module).__mro__:
            adapter = self.adapters.get(cls)
            if adapter is not None:
                return adapter
        return None


def _check_rule(rule: object, plugin: str) -> type[Rule[Any]]:
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise PluginError(f"plugin {plugin!r}: kfe_rules returned {rule!r}, not a Rule subclass")
    for attr in ("name", "Config", "State"):
        if not hasattr(rule, attr):
            raise PluginError(f"plugin {plugin!r}: rule {rule.__name__} lacks {attr!r}")
    config = rule.Config
    if not (isinstance(config, type) and issubclass(config, RuleConfig)):
        raise PluginError(f"plugin {plugin!r}: {rule.__name__}.Config must subclass RuleConfig")
    tag = config.model_fields["name"].annotation
    if typing.get_origin(tag) is not typing.Literal or typing.get_args(tag) != (rule.name,):
        raise PluginError(
            f"plugin {plugin!r}: {rule.__name__}.Config.name must be Literal[{rule.name!r}]"
        )
    if not rule.policies:
        raise PluginError(f"plugin {plugin!r}: rule {rule.name!r} declares no basis policy")
    return rule


def _check_adapter(adapter: object, plugin: str) -> LayerAdapter:
    if not isinstance(adapter, LayerAdapter):
        raise PluginError(f"plugin {plugin!r}: {adapter!r} is not a LayerAdapter instance")
    module_type = getattr(adapter, "module_type", None)
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise PluginError(f"plugin {plugin!r}: adapter {adapter!r} has no nn.Module module_type")
    return adapter


def _plugin_name(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    return pm.get_name(impl.plugin) or repr(impl.plugin)


def _results(impl: pluggy.HookImpl) -> list[Any]:
    result: Any = impl.function()
    return list(result or ())


def load_registry(plugins: Iterable[object] | None = None) -> Registry:
    """Build a registry from ``plugins``, or from the ``kfe`` entry points if ``None``.

    Raises:
        pluggy.PluginValidationError: a hook implementation whose signature does not
            match :mod:`kfe.hookspecs`, or a ``kfe_`` hook the spec does not define.
        PluginError: a hook returned something that breaks the contract (wrong type,
            a duplicate rule name or module type).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if plugins is None:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    else:
        for plugin in plugins:
            pm.register(plugin, name=getattr(plugin, "__name__", None))
    pm.check_pending()

    rules: dict[str, type[Rule[Any]]] = {}
    adapters: dict[type[nn.Module], LayerAdapter] = {}
    # Call each implementation on its own so errors name the plugin.
    for impl in reversed(pm.hook.kfe_rules.get_hookimpls()):
        name = _plugin_name(pm, impl)
        for rule in _results(impl):
            rule = _check_rule(rule, name)
            if rule.name in rules:
                raise PluginError(f"plugin {name!r}: rule {rule.name!r} is already registered")
            rules[rule.name] = rule
    for impl in reversed(pm.hook.kfe_layer_adapters.get_hookimpls()):
        name = _plugin_name(pm, impl)
        for adapter in _results(impl):
            adapter = _check_adapter(adapter, name)
            if adapter.module_type in adapters:
                raise PluginError(
                    f"plugin {name!r}: {adapter.module_type.__name__} already has an adapter"
                )
            adapters[adapter.module_type] = adapter
    return Registry(rules=rules, adapters=adapters)


@functools.cache
def default_registry() -> Registry:
    """The registry of every installed plugin (``kfe`` entry points), loaded once."""
    return load_registry()
