"""kfe: optimizers that act diagonally in a Kronecker-factored eigenbasis.

Quick start::

    import kfe
    opt = kfe.KFEOptimizer(model, rule="ekfac", lr=1e-3, damping=1e-3)

See ``docs/`` for the math, the configuration and the plugin contract.
"""

from kfe.adapter import LayerAdapter
from kfe.basis import Eigenbasis

# The optimizer and config import the registry; keep the plugin-facing names above.
from kfe.config import config_model, json_schema, load_config
from kfe.hookspecs import hookimpl
from kfe.inspection import LayerCurvature, inspect_layer
from kfe.optimizer import KFEOptimizer
from kfe.registry import PluginError, Registry, default_registry, load_registry
from kfe.rule import BasisPolicy, Rule, RuleConfig, RuleContext, Statistic
from kfe.source import BasisSource, BasisSourceConfig

__version__ = "0.1.0"

__all__ = [
    "BasisPolicy",
    "BasisSource",
    "BasisSourceConfig",
    "Eigenbasis",
    "KFEOptimizer",
    "LayerAdapter",
    "LayerCurvature",
    "PluginError",
    "Registry",
    "Rule",
    "RuleConfig",
    "RuleContext",
    "Statistic",
    "config_model",
    "default_registry",
    "hookimpl",
    "inspect_layer",
    "json_schema",
    "load_config",
    "load_registry",
]
