"""Every built-in rule x basis through the conformance suite of :mod:`kfe.testing`."""

from kfe.testing import RuleConformance
from tests.conftest import BUILTIN_PLUGINS


class TestBuiltins(RuleConformance):
    plugins = BUILTIN_PLUGINS
