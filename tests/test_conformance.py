"""Every built-in rule x basis through the conformance suite of :mod:`kfe.testing`."""

from typing import Any, ClassVar

from kfe.testing import RuleConformance
from tests.conftest import BUILTIN_PLUGINS


class TestBuiltins(RuleConformance):
    plugins = BUILTIN_PLUGINS


class TestBuiltinsLowPrecision(RuleConformance):
    """The same checks with the step's large matmuls in bfloat16 (``matmul_dtype``):
    convergence, bit-for-bit resume, dtypes, finiteness at a refresh and ``lr=0`` hold."""

    plugins = BUILTIN_PLUGINS
    settings: ClassVar[dict[str, Any]] = {"matmul_dtype": "bfloat16"}


class TestBuiltinsFp32Bf16(RuleConformance):
    """The same checks with the lowerable float32 matmuls under oneDNN's ``bf16``
    precision (``fp32_matmul_precision``): bit-for-bit resume included."""

    plugins = BUILTIN_PLUGINS
    settings: ClassVar[dict[str, Any]] = {"fp32_matmul_precision": "bf16"}
