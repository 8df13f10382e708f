"""The plugin's own tests: kfe's conformance suite, with one import."""

from kfe.testing import RuleConformance


class TestLion(RuleConformance):
    rules = ("lion",)
