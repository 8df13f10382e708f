"""The experiment config: one YAML file says what to train, on what, with what.

The schema is built from the plugin registry (as :func:`kfe.config.config_model` is), so
a rule a plugin registers is a valid ``optimizer.rule`` here with no edit, and the
``model`` section is a discriminated union of :data:`kfe.models.MODEL_CONFIGS`::

    name: ae-ekfac
    epochs: 8
    data: {name: mnist, batch_size: 1000}
    model: {name: autoencoder}
    optimizer: {rule: ekfac, lr: 0.01, damping: 0.1}   # type: kfe is the default
    ablate:                                             # only read by `kfe ablate`
      grid: {optimizer.lr: [0.003, 0.01], seed: [0, 1]}

``optimizer`` is either ``type: kfe`` (every field of :class:`kfe.KFEOptimizer`'s
config) or ``type: torch`` (a ``torch.optim`` baseline). Overrides (``--set a.b=v``)
are applied to the raw mapping before validation, so they are validated like the file.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    create_model,
    model_validator,
)

from kfe.config import KFEConfigBase, config_model
from kfe.data import DATASETS
from kfe.models import MODEL_CONFIGS, ModelConfig, Task
from kfe.registry import Registry, default_registry

__all__ = [
    "TASK_LOSSES",
    "AblateConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfigBase",
    "TorchOptimizerConfig",
    "Variant",
    "apply_overrides",
    "experiment_model",
    "format_validation_error",
    "load_experiment",
    "set_path",
    "without_location",
]

_FROZEN = ConfigDict(
    frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
)

TASK_LOSSES: dict[Task, tuple[str, ...]] = {
    "classify": ("cross_entropy", "mse"),
    "reconstruct": ("bce", "mse"),
}
"""The losses each model task takes (``mse``: one-hot labels, or the input itself)."""


class ConfigError(ValueError):
    """A bad experiment config; the message names the field and the allowed values."""


class DataConfig(BaseModel):
    """Which dataset, how much of it, and how it is batched."""

    model_config = _FROZEN
    name: Literal[DATASETS]  # type: ignore[valid-type]
    """Dataset (all offline; see docs/datasets.md)."""
    data_dir: str | None = None
    """Where to look first (default: ``$KFE_DATA_DIR``, then the system sources)."""
    train_limit: PositiveInt | None = None
    """Keep only the first this many training examples (tiny runs, tests)."""
    test_limit: PositiveInt | None = None
    """Keep only the first this many test examples."""
    batch_size: PositiveInt = 1000
    """Global minibatch size (split evenly across ranks under torchrun)."""
    eval_batch_size: PositiveInt = 2000
    """Batch size of evaluation passes (no effect on results)."""
    eval_train_limit: PositiveInt | None = None
    """Evaluate the training loss on the first this many examples (default: all)."""


_Beta = Annotated[float, Field(ge=0, lt=1)]
# a folder name: no path separator, not "." or ".."
_FILE_NAME = r"^[A-Za-z0-9_.@+=-]*[A-Za-z0-9_@+=-][A-Za-z0-9_.@+=-]*$"


class TorchOptimizerConfig(BaseModel):
    """A ``torch.optim`` baseline, side by side with kfe's rules."""

    model_config = _FROZEN
    type: Literal["torch"] = "torch"
    name: Literal["sgd", "adam", "adamw", "rmsprop"]
    """``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``."""
    lr: float = Field(1e-3, ge=0)
    """Learning rate."""
    momentum: float = Field(0.0, ge=0)
    """Momentum (``sgd``, ``rmsprop``)."""
    nesterov: bool = False
    """Nesterov momentum (``sgd``)."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """Moment decays (``adam``, ``adamw``), each in ``[0, 1)``."""
    alpha: float = Field(0.99, ge=0, lt=1)
    """Second-moment decay (``rmsprop``)."""
    eps: float = Field(1e-8, gt=0)
    """Denominator guard (``adam``, ``adamw``, ``rmsprop``)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay as the torch optimizer defines it."""

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TorchOptimizerConfig:
        if self.nesterov and not (self.name == "sgd" and self.momentum > 0):
            raise ValueError(
                f"nesterov: needs name 'sgd' and momentum > 0 (got name {self.name!r}, "
                f"momentum {self.momentum})"
            )
        return self

    def build(self, params: Iterable[Any]) -> Any:
        """The ``torch.optim`` optimizer over ``params``."""
        import torch

        common: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            return torch.optim.SGD(params, momentum=self.momentum, nesterov=self.nesterov, **common)
        if self.name == "rmsprop":
            return torch.optim.RMSprop(
                params, alpha=self.alpha, eps=self.eps, momentum=self.momentum, **common
            )
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, betas=self.betas, eps=self.eps, **common)


class AblateConfig(BaseModel):
    """A grid of runs: every combination of the ``grid`` axes, for every variant.

    An axis is any dotted config path (``optimizer.lr``, ``seed``, ``model.width``);
    a variant is a named set of overrides with its own extra axes, so that
    baselines without ``damping`` need not share the damping axis::

        ablate:
          grid: {seed: [0, 1]}
          variants:
            - {name: adam, set: {optimizer: {type: torch, name: adam}},
               grid: {optimizer.lr: [0.0003, 0.001]}}
            - {name: ekfac, set: {optimizer.rule: ekfac},
               grid: {optimizer.lr: [0.01, 0.03], optimizer.damping: [0.01, 0.1]}}
    """

    model_config = _FROZEN
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Axes shared by every variant: dotted path -> values."""
    variants: list[Variant] = Field(default_factory=list)
    """Named override sets, each with its own axes (default: one unnamed variant)."""
    workers: PositiveInt | Literal["auto"] = "auto"
    """Parallel worker processes (``auto``: one per 2 cores, at least 1)."""


class Variant(BaseModel):
    """One arm of an ablation: fixed overrides plus its own axes."""

    model_config = _FROZEN
    name: str = Field(pattern=_FILE_NAME)
    """Label of the arm in tables and plots."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides (dotted paths) applied to the base config."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Axes of this arm only."""


AblateConfig.model_rebuild()


class ExperimentConfigBase(BaseModel):
    """Everything about a run except the registry-built ``model``/``optimizer`` unions."""

    model_config = _FROZEN
    _registry: ClassVar[Registry]

    name: str = Field("run", pattern=_FILE_NAME)
    """Name of the run (the default output folder is ``runs/<name>``): letters, digits
    and ``_.@+=-``, no path separator."""
    seed: NonNegativeInt = 0
    """Seeds model initialisation, data order and Monte Carlo Fisher labels."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available (under torchrun: the local rank's GPU)."""
    threads: PositiveInt | None = None
    """``torch.set_num_threads`` (default: torch's choice)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """``bfloat16``: forward passes under ``torch.autocast`` in bfloat16 (parameters,
    gradients, the loss and the optimizer state stay float32); evaluation too."""
    compile: bool = False
    """Train through ``torch.compile(model)`` (inductor). kfe's capture hooks are traced:
    steps that update no statistic run one graph; statistic steps break the graph at
    each tracked layer. Evaluation runs the eager module. See docs/optimizer.md."""
    epochs: PositiveInt = 10
    """Passes over the training set."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps in all (evaluated once more at the stop)."""
    loss: Literal["auto", "cross_entropy", "bce", "mse"] = "auto"
    """``auto``: cross-entropy for classifiers, BCE-with-logits summed over pixels for
    the auto-encoder (mean over the batch in both)."""
    data: DataConfig
    """The dataset section."""
    progress: bool = True
    """Progress bars (epochs and batches) on stderr."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<run>/tb``."""
    checkpoint_every: PositiveInt = 1
    """Write ``checkpoint.pt`` every this many epochs (and at the end)."""
    ablate: AblateConfig | None = None
    """The grid that ``kfe ablate`` runs (ignored by ``kfe train``)."""

    @model_validator(mode="before")
    @classmethod
    def _default_optimizer_type(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            opt = data.get("optimizer")
            if isinstance(opt, Mapping) and "type" not in opt:
                data["optimizer"] = {**opt, "type": "kfe"}
            model = data.get("model")
            if isinstance(model, str):
                data["model"] = {"name": model}
            elif isinstance(model, Mapping) and model.get("name") not in MODEL_CONFIGS:
                known = ", ".join(sorted(MODEL_CONFIGS))
                raise ValueError(f"model.name: unknown model {model.get('name')!r}; known: {known}")
        return data

    @model_validator(mode="after")
    def _loss_fits_the_task(self) -> ExperimentConfigBase:
        task = self.model_section.task
        if self.loss != "auto" and self.loss not in TASK_LOSSES[task]:
            allowed = ", ".join(("auto", *TASK_LOSSES[task]))
            raise ValueError(
                f"loss: {self.loss!r} does not fit model {self.model_section.name!r} "
                f"(task {task}); allowed: {allowed}"
            )
        return self

    @property
    def model_section(self) -> ModelConfig:
        return getattr(self, "model")  # noqa: B009

    @property
    def optimizer_section(self) -> KFEConfigBase | TorchOptimizerConfig:
        return getattr(self, "optimizer")  # noqa: B009

    @property
    def loss_kind(self) -> Literal["cross_entropy", "bce", "mse"]:
        if self.loss != "auto":
            return self.loss
        return "bce" if self.model_section.task == "reconstruct" else "cross_entropy"

    @property
    def label(self) -> str:
        """Short name of the optimizer: ``adam (torch)``, ``ekfac``, ``adam@shampoo``."""
        opt = self.optimizer_section
        if isinstance(opt, TorchOptimizerConfig):
            return f"{opt.name} (torch)"
        basis = opt.basis_config.name
        return opt.rule_config.name if basis == "kfac" else f"{opt.rule_config.name}@{basis}"


@functools.cache
def experiment_model(registry: Registry | None = None) -> type[ExperimentConfigBase]:
    """The ``ExperimentConfig`` model for the plugins of ``registry``."""
    registry = registry or default_registry()
    kfe_section = create_model(
        "KFEOptimizerSection",
        __base__=config_model(registry),
        type=(Literal["kfe"], Field("kfe", description="kfe's KFEOptimizer.")),
    )
    optimizer = Annotated[
        Union[kfe_section, TorchOptimizerConfig],  # type: ignore[valid-type]  # noqa: UP007
        Field(discriminator="type"),
    ]
    models = tuple(MODEL_CONFIGS.values())
    model_union = (
        models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007
    )
    model = create_model(
        "ExperimentConfig",
        __base__=ExperimentConfigBase,
        model=(model_union, Field(description="The network (see docs/models.md).")),
        optimizer=(
            optimizer,
            Field(
                default_factory=lambda: kfe_section.model_validate({}), description="The optimizer."
            ),
        ),
    )
    model._registry = registry
    return model


def kfe_settings(section: KFEConfigBase) -> dict[str, Any]:
    """The ``KFEOptimizer`` keyword settings of an experiment's ``optimizer`` section."""
    return section.model_dump(exclude={"type"})


# -- overrides and loading ---------------------------------------------------------


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted ``path`` in nested mappings, creating levels as needed.

    A level given as a bare name (``optimizer.rule: ekfac`` then ``optimizer.rule.
    estimator``) is promoted to ``{"name": ...}`` so rule fields can be overridden.
    """
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"{path!r}: not a dotted field path")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if isinstance(child, str):
            child = {"name": child}
        elif child is None:
            child = {}
        elif not isinstance(child, Mapping):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"{path!r}: {where} is not a section (it holds {json.dumps(child)}); set it "
                f"whole, e.g. --set '{where}={json.dumps(child)}'"
            )
        node[key] = child = dict(child)
        node = child
    node[keys[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``path=value`` strings; values are parsed as YAML (``1e-3``, ``[1, 2]``)."""
    result = json.loads(json.dumps(data))  # a deep copy of plain data
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected path.to.field=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
        set_path(result, path.strip(), value)
    return result


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: the dotted field path as the user writes it, then pydantic's
    message (which lists the allowed values for literals and unions).

    The tags of discriminated unions (``optimizer.kfe.rule.ekfac.decay``) are dropped
    from the path (``optimizer.rule.decay``), and a validator's message that starts with
    a field path (``loss: ...``) has that path joined to the location.
    """
    lines = []
    for item in error.errors():
        raw = [str(part) for part in item["loc"]]
        loc = [
            part
            for i, part in enumerate(raw)
            # the tag follows the union's field (``rule``), unless it is the last part
            if not (_is_union_tag(part) or (0 < i < len(raw) - 1 and raw[i - 1] in _UNION_FIELDS))
        ]
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        head = _FIELD_PREFIX.match(msg)
        if head:
            loc.append(head["path"])
            msg = head["rest"]
        lines.append(f"{'.'.join(loc) or '(config)'}: {msg}")
    return "\n".join(lines)


# config fields holding a union tagged by ``name`` (the tag follows them in a location)
_UNION_FIELDS = ("rule", "basis", "fallback")
_FIELD_PREFIX = re.compile(r"^(?P<path>[A-Za-z_][\w.]*): (?P<rest>.*)$", re.DOTALL)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value of a tagged union into the location
    # (``optimizer.kfe.lr``); keep the user's path (``optimizer.lr``)
    return isinstance(part, str) and (
        part in MODEL_CONFIGS or part in ("kfe", "torch") or part.startswith("function-")
    )


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML (``safe_load``) or JSON file that must hold a mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping, not {type(data).__name__}")
    return dict(data)


def validate_experiment(
    data: Mapping[str, Any], registry: Registry | None = None
) -> ExperimentConfigBase:
    """Validate a mapping; a :class:`ConfigError` names every bad field."""
    try:
        return experiment_model(registry).model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_experiment(
    source: str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    registry: Registry | None = None,
) -> ExperimentConfigBase:
    """Read, override and validate an experiment config."""
    data = read_mapping(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    return validate_experiment(apply_overrides(data, overrides), registry)


def without_location(config: Mapping[str, Any]) -> dict[str, Any]:
    """A dumped config without ``data.data_dir``, which says only where the dataset's
    files are: a run resumed, or an ablation restarted, with the data moved (another
    ``--data-dir``) is the same run."""
    data = config.get("data")
    if not isinstance(data, Mapping):
        return dict(config)
    return {**config, "data": {k: v for k, v in data.items() if k != "data_dir"}}


def dump_experiment(config: ExperimentConfigBase) -> dict[str, Any]:
    """The config as plain data (YAML/JSON-safe), which validates back to itself."""
    return config.model_dump(mode="json")
