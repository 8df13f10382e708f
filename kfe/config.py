"""Configuration: frozen pydantic v2 models; the rule section is built from the registry.

:func:`config_model` returns a ``KFEConfig`` class whose ``rule`` and ``fallback``
fields are a discriminated union (tag ``name``) of the ``Config`` classes of every
registered rule, so a plugin's rule and its fields appear in validation and in
:func:`json_schema` with no edit here. A rule may be given as its name alone
(``rule="ekfac"``) or as a mapping (``rule={"name": "ekfac", "estimator": "batch"}``);
the ``basis`` field is built the same way from the registered basis sources.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    create_model,
    model_validator,
)

from kfe.precision import Fp32Precision
from kfe.registry import Registry, default_registry
from kfe.rule import RuleConfig, Statistic
from kfe.source import BasisSourceConfig

__all__ = ["KFEConfigBase", "config_model", "json_schema", "load_config"]


class KFEConfigBase(BaseModel):
    """Every setting of :class:`kfe.KFEOptimizer` except the rule sections."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )
    _registry: ClassVar[Registry]

    lr: float = Field(1e-3, ge=0)
    """Learning rate (a ``param_groups`` entry: schedulers may change it)."""
    damping: float = Field(1e-3, ge=0)
    """Tikhonov damping added to the rule's curvature diagonal (a ``param_groups`` entry)."""
    momentum: float = Field(0.0, ge=0)
    """Heavy-ball momentum on the parameter-space direction, as in ``torch.optim.SGD``."""
    dampening: float = Field(0.0, ge=0, le=1)
    """Momentum dampening, as in ``torch.optim.SGD``."""
    nesterov: bool = False
    """Nesterov momentum, as in ``torch.optim.SGD`` (needs momentum > 0, dampening = 0)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight-decay coefficient."""
    weight_decay_style: Literal["decoupled", "l2"] = "decoupled"
    """``decoupled``: ``p *= 1 - lr * wd`` outside the rule (AdamW); ``l2``: ``wd * p`` is
    added to the gradient before the rule (``torch.optim.SGD``'s weight decay)."""
    factor_every: PositiveInt = 10
    """Update the Kronecker-factor EMAs every this many steps."""
    basis_every: PositiveInt = 100
    """Recompute the eigenbasis every this many steps (the expensive part)."""
    lambda_every: PositiveInt = 10
    """Update per-example KFE statistics (EKFAC's Lambda) every this many steps."""
    factor_decay: float = Field(0.95, ge=0, lt=1)
    """EMA decay of the factors: ``A <- decay * A + (1 - decay) * A_batch``."""
    factor_init: tuple[PositiveFloat, PositiveFloat] | None = None
    """Start the factor EMAs at ``(s_A I, s_B I)`` and fold the first batch in like any
    other (KAISA's start; for ``s_B >> B`` the early steps precondition by ``A`` only).
    What is left of it, ``s * factor_decay^k`` after ``k`` folds, is a prior in K-FAC's
    model that ``ekfac`` keeps next to Lambda (:meth:`kfe.RuleContext.with_prior`).
    ``None``: the first batch's factors themselves (Martens & Grosse's start)."""
    fisher: Literal["empirical", "true"] = "empirical"
    """``empirical``: training labels, no extra call; ``true``: labels sampled from the
    model (call ``optimizer.sample_fisher(output, kind, reduction=...)`` before
    ``loss.backward()``). YAML's unquoted ``true`` (a boolean) is read as ``"true"``."""
    batch_averaged: bool = True
    """The loss is a mean over the batch (captured gradients are rescaled by ``n``)."""
    eigensolver: Literal["eigh", "power_qr"] = "eigh"
    """``eigh``: exact robust eigendecomposition at every refresh; ``power_qr``: after the
    first (exact) refresh, one warm-started power step and a QR, as SOAP does: cheaper,
    approximate, and the eigenvector order follows the previous basis."""
    eigh_dtype: Literal["float32", "float64"] | None = None
    """Dtype of the first ``eigh`` try (default: the factor's); float64 is the retry."""
    matmul_dtype: Literal["bfloat16", "float16"] | None = None
    """Dtype of the step's large matmuls outside the factors: Lambda and the projected
    gradient from the captures, the rotations into and out of the KFE, and the rotation
    of moments at a refresh. Their inputs are rounded to it (``bfloat16``: 8
    significant bits, relative rounding ``2^-9``) and their results cast back. The
    factors' Gram matrices, their EMAs, the eigendecompositions, rule state and the
    parameter update stay in the parameters' dtype (factors rounded to bfloat16 lose
    their small eigendirections and training suffers, docs/precision.md). ``None``: the
    parameters' dtype (exact; the torch.optim limits hold only then). On CPUs with
    AVX512-BF16 and on tensor-core GPUs ``bfloat16`` matmuls run several times faster."""
    fp32_matmul_precision: Fp32Precision | None = None
    """Backend precision of the float32 matmuls ``matmul_dtype`` would lower (Lambda and
    the projected gradient, the rotations into and out of the KFE, the moment rotation at
    a refresh) and of a rule's shortcut, set around them only
    (``torch.backends.mkldnn.matmul.fp32_precision``, and
    ``torch.backends.cuda.matmul.fp32_precision`` for ``ieee``/``tf32``) and restored
    after: inputs, results and every other matmul stay float32 at the process's setting.
    ``bf16`` (CPU, oneDNN): on CPUs with AVX512-BF16 2.1x faster than float32 here, and
    within 1.5x of float32's rounding error (oneDNN promises only bfloat16's accuracy,
    docs/precision.md); ``tf32``: CUDA (and oneDNN where supported). A rule's
    parameter-space shortcut (``kfac`` split's inverse factors) runs under it too.
    ``ieee``: float32 there even if the process lowers matmuls; ``None``: leave the
    process's setting."""
    lambda_chunk_mb: PositiveInt = 8
    """Memory cap (MiB) on the temporaries of Lambda with several positions per example
    (per-example projected gradients, or products of position pairs); small enough to
    stay in a CPU's last-level cache (64 was 2.5x slower on conv-sized blocks)."""
    kl_clip: PositiveFloat | None = None
    """K-FAC's KL clipping (Ba et al., 2017; KAISA): scale all directions by
    ``min(1, sqrt(kl_clip / sum_p lr^2 <D_p, grad_p>))``, a trust region that lets small
    damping be used without blow-ups. ``None``: off."""
    distributed_eigh: Literal["owner", "all"] = "owner"
    """Under ``torch.distributed`` with several ranks: ``owner``: each Kronecker factor is
    eigendecomposed by one rank (a greedy balance of the ``d^3`` costs) and broadcast;
    ``all``: every rank decomposes every factor (no broadcast, no split of the cost)."""
    comm_timeout_s: PositiveFloat | None = None
    """Seconds within which each of the optimizer's collectives must complete, else the
    step raises ``kfe.distributed.CollectiveError`` naming it (a rank died or hung). The
    optimizer then uses a process group of its own with this timeout; ``None``: the
    default group's (``init_process_group(timeout=...)``). Must exceed a refresh's time."""

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("fisher") is True:  # YAML reads an unquoted ``fisher: true`` as a bool
            data["fisher"] = "true"
        registry = cls._registry
        for key, known, kind, plural in (
            ("rule", registry.rules, "rule", "rules"),
            ("fallback", registry.rules, "rule", "rules"),
            ("basis", registry.bases, "basis", "bases"),
        ):
            value = data.get(key)
            if isinstance(value, str):
                value = {"name": value}
            if isinstance(value, Mapping):
                name = value.get("name")
                listed = f"registered {plural}: {', '.join(sorted(known))}"
                if name is None:
                    raise ValueError(f"{key}.name: missing (a {kind} mapping names it); {listed}")
                if name not in known:
                    raise ValueError(f"{key}: unknown {kind} {name!r}; {listed}")
                data[key] = value
        return data

    @model_validator(mode="after")
    def _compatible(self) -> KFEConfigBase:
        registry = self._registry
        rule = registry.rules[self.rule_config.name]
        source = registry.bases[self.basis_config.name]
        if Statistic.EIGENVALUES in rule.needs and not source.fisher_eigenvalues:
            with_values = sorted(n for n, b in registry.bases.items() if b.fisher_eigenvalues)
            raise ValueError(
                f"basis: rule {rule.name!r} needs Fisher factor eigenvalues, which basis "
                f"{source.name!r} does not provide; use one of {with_values}"
            )
        fallback = self.fallback_config
        needs = registry.rules[fallback.name].needs
        if needs:
            usable = sorted(n for n, r in registry.rules.items() if not r.needs)
            raise ValueError(
                f"fallback: rule {fallback.name!r} needs {sorted(s.value for s in needs)}, "
                f"which parameters outside tracked layers do not have; usable: {usable}"
            )
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening = 0")
        return self

    @property
    def rule_config(self) -> RuleConfig:
        return getattr(self, "rule")  # noqa: B009

    @property
    def fallback_config(self) -> RuleConfig:
        return getattr(self, "fallback")  # noqa: B009

    @property
    def basis_config(self) -> BasisSourceConfig:
        return getattr(self, "basis")  # noqa: B009

    def group_defaults(self) -> dict[str, Any]:
        """The hyperparameters that live in ``param_groups``."""
        keys = ("lr", "damping", "momentum", "dampening", "nesterov", "weight_decay")
        return {k: getattr(self, k) for k in keys}


@functools.cache
def config_model(registry: Registry | None = None) -> type[KFEConfigBase]:
    """The ``KFEConfig`` model for the rules of ``registry`` (default: installed plugins)."""
    registry = registry or default_registry()

    def tagged_union(configs: tuple[type[BaseModel], ...], kind: str) -> Any:
        if not configs:
            raise ValueError(f"no {kind} is registered: is the kfe package installed?")
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007

    rules = tagged_union(tuple(r.Config for r in registry.rules.values()), "rule")
    bases = tagged_union(tuple(b.Config for b in registry.bases.values()), "basis")

    def default(known: Mapping[str, Any], name: str) -> Any:
        return known[name].Config.model_validate({}) if name in known else ...

    model = create_model(
        "KFEConfig",
        __base__=KFEConfigBase,
        rule=(rules, Field(default(registry.rules, "ekfac"), description="The diagonal rule.")),
        basis=(bases, Field(default(registry.bases, "kfac"), description="The basis source.")),
        fallback=(
            rules,
            Field(default(registry.rules, "sgd"), description="Rule for untracked parameters."),
        ),
    )
    model._registry = registry
    return model


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any], registry: Registry | None = None
) -> KFEConfigBase:
    """Validate a config from a mapping or a ``.yaml``/``.yml``/``.json`` file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: the config must be a mapping, not {type(data).__name__}")
        source = data
    return config_model(registry).model_validate(dict(source))


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of the config, with every registered rule's fields."""
    return config_model(registry).model_json_schema()
