"""The plugin contract: every hook a kfe plugin may implement, in one file.

A plugin is any module or object with ``@kfe.hookimpl`` functions named below. It is
found through the ``kfe`` entry-point group::

    [project.entry-points.kfe]
    myrule = "my_package.myrule"

Built-in rules, basis sources and layer adapters (the ``kfe_plugins`` package)
register through these same hooks. Hooks take no arguments today; an implementation
that declares arguments the spec does not have is rejected when it is registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kfe.adapter import LayerAdapter
    from kfe.rule import Rule
    from kfe.source import BasisSource

PROJECT = "kfe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kfe_rules() -> Sequence[type[Rule[Any]]]:
    """Return the diagonal-rule classes this plugin provides.

    Each class subclasses :class:`kfe.rule.Rule`, with a unique ``name`` equal to the
    ``Literal`` tag of its ``Config``.
    """
    raise NotImplementedError


@hookspec
def kfe_layer_adapters() -> Sequence[LayerAdapter]:
    """Return layer adapters (instances of :class:`kfe.adapter.LayerAdapter`).

    At most one adapter per ``module_type`` across all plugins.
    """
    raise NotImplementedError


@hookspec
def kfe_bases() -> Sequence[type[BasisSource]]:
    """Return basis-source classes (subclasses of :class:`kfe.source.BasisSource`).

    Each with a unique ``name`` equal to the ``Literal`` tag of its ``Config``.
    """
    raise NotImplementedError
