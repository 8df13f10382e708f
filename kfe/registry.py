"""The plugin manager: loads rules and layer adapters from plugins, checked at load time.

:func:`load_registry` with no argument registers everything in the ``kfe``
entry-point group (the built-ins included, as a third-party package would be); tests
pass an explicit list of plugin objects so they do not depend on what is installed.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel
from torch import nn

from kfe import hookspecs
from kfe.adapter import LayerAdapter
from kfe.rule import Rule, RuleConfig
from kfe.source import BasisSource, BasisSourceConfig

__all__ = ["PluginError", "Registry", "default_registry", "load_registry"]


class PluginError(TypeError):
    """A plugin broke the contract of :mod:`kfe.hookspecs`."""


@dataclass(frozen=True, eq=False)
class Registry:
    """What the loaded plugins provide: rules and bases by name, adapters by module type.

    Compared and hashed by identity, so derived models (:func:`kfe.config.config_model`)
    are cached per registry.
    """

    rules: Mapping[str, type[Rule[Any]]]
    adapters: Mapping[type[nn.Module], LayerAdapter]
    bases: Mapping[str, type[BasisSource]]

    def rule(self, name: str) -> type[Rule[Any]]:
        try:
            return self.rules[name]
        except KeyError:
            raise ValueError(
                f"unknown rule {name!r}; registered rules: {', '.join(sorted(self.rules))}"
            ) from None

    def basis(self, name: str) -> type[BasisSource]:
        try:
            return self.bases[name]
        except KeyError:
            raise ValueError(
                f"unknown basis {name!r}; registered bases: {', '.join(sorted(self.bases))}"
            ) from None

    def adapter_for(self, module: nn.Module) -> LayerAdapter | None:
        """The adapter of the most specific registered base class of ``module``."""
        for cls in type(module).__mro__:
            adapter = self.adapters.get(cls)
            if adapter is not None:
                return adapter
        return None


def _check_tagged(item: object, base: type, config_base: type[BaseModel], plugin: str) -> Any:
    """A rule or basis class: the right base, a ``Config``, ``Config.name == Literal[name]``."""
    kind = base.__name__
    if not (isinstance(item, type) and issubclass(item, base)):
        raise PluginError(f"plugin {plugin!r}: returned {item!r}, not a {kind} subclass")
    cls: Any = item
    for attr in ("name", "Config"):
        if not hasattr(cls, attr):
            raise PluginError(f"plugin {plugin!r}: {kind} {cls.__name__} lacks {attr!r}")
    config: Any = cls.Config
    if not (isinstance(config, type) and issubclass(config, config_base)):
        raise PluginError(
            f"plugin {plugin!r}: {cls.__name__}.Config must subclass {config_base.__name__}"
        )
    tag = config.model_fields["name"].annotation
    if typing.get_origin(tag) is not typing.Literal or typing.get_args(tag) != (cls.name,):
        raise PluginError(
            f"plugin {plugin!r}: {cls.__name__}.Config.name must be Literal[{cls.name!r}]"
        )
    return cls


def _check_rule(rule: object, plugin: str) -> type[Rule[Any]]:
    checked: type[Rule[Any]] = _check_tagged(rule, Rule, RuleConfig, plugin)
    if not hasattr(checked, "State"):
        raise PluginError(f"plugin {plugin!r}: rule {checked.__name__} lacks 'State'")
    if not checked.policies:
        raise PluginError(f"plugin {plugin!r}: rule {checked.name!r} declares no basis policy")
    return checked


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


def _collect(
    pm: pluggy.PluginManager,
    hook: Any,
    check: Callable[[Any, str], Any],
    key: Callable[[Any], Any],
) -> dict[Any, Any]:
    """Call each implementation of ``hook`` on its own (so errors name the plugin), in
    registration order; check every item; refuse duplicate keys."""
    found: dict[Any, Any] = {}
    for impl in reversed(hook.get_hookimpls()):
        plugin = _plugin_name(pm, impl)
        for item in _results(impl):
            item = check(item, plugin)
            k = key(item)
            if k in found:
                shown = k.__name__ if isinstance(k, type) else repr(k)
                raise PluginError(f"plugin {plugin!r}: {shown} is already registered")
            found[k] = item
    return found


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
        if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Iterable):
            raise TypeError(f"plugins: must be a list of plugin objects, not {plugins!r}")
        hooks = [name for name in vars(hookspecs) if name.startswith(f"{hookspecs.PROJECT}_")]
        for i, plugin in enumerate(plugins):
            # any ``kfe_`` attribute counts: pluggy then checks its name and signature
            if not any(name.startswith(f"{hookspecs.PROJECT}_") for name in dir(plugin)):
                raise PluginError(
                    f"plugins[{i}]: {plugin!r} implements no kfe hook ({', '.join(hooks)})"
                )
            pm.register(plugin, name=getattr(plugin, "__name__", None))
    pm.check_pending()

    return Registry(
        rules=_collect(pm, pm.hook.kfe_rules, _check_rule, lambda r: r.name),
        adapters=_collect(pm, pm.hook.kfe_layer_adapters, _check_adapter, lambda a: a.module_type),
        bases=_collect(
            pm,
            pm.hook.kfe_bases,
            lambda b, plugin: _check_tagged(b, BasisSource, BasisSourceConfig, plugin),
            lambda b: b.name,
        ),
    )


@functools.cache
def default_registry() -> Registry:
    """The registry of every installed plugin (``kfe`` entry points), loaded once."""
    return load_registry()
