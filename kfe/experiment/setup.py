"""Turn a validated experiment config into live objects: data, model, optimizer, loss.

Shared by ``kfe train``, ``kfe profile`` and ``kfe diagnose`` so that all three see
exactly the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfe.capture import Reduction
from kfe.data import Dataset, DatasetNotFound, load_dataset
from kfe.experiment.config import (
    ConfigError,
    ExperimentConfigBase,
    TorchOptimizerConfig,
    kfe_settings,
)
from kfe.models import Task
from kfe.optimizer import KFEOptimizer
from kfe.registry import Registry

__all__ = ["LOSS_REDUCTION", "Experiment", "LossFn", "build_experiment", "loss_function"]

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``loss(output, x, y)``: a scalar, the mean over the batch."""


LOSS_REDUCTION: Reduction = "sum"
"""Every task loss below sums an example's output terms (what ``sample_fisher`` is told,
so that the true Fisher is on the loss's scale)."""


def loss_function(kind: str, task: Task | None = None) -> LossFn:
    """The batch-mean loss of a task, each example's output terms summed:

    * ``cross_entropy``: ``mean_i -log softmax(out_i)[y_i]``;
    * ``bce``: the auto-encoder's reconstruction loss, BCE-with-logits against the
      input, summed over pixels and averaged over the batch (the seed paper's);
    * ``mse``: ``mean_i ||out_i - t_i||^2`` (torch's squared error summed over the
      outputs: the Gaussian negative log-likelihood with variance 1/2, up to a constant),
      with the target ``t`` the input for ``task="reconstruct"``, the one-hot label for
      ``task="classify"``, and ``y`` itself otherwise (regression).

    The kinds a model's task allows are :data:`kfe.experiment.config.TASK_LOSSES`.
    """
    if kind == "cross_entropy":
        return lambda out, x, y: F.cross_entropy(out, y)
    if kind == "bce":
        return lambda out, x, y: (
            F.binary_cross_entropy_with_logits(out, x.reshape(out.shape), reduction="sum")
            / len(out)
        )
    if kind == "mse":

        def target(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
            if task == "reconstruct":
                return x.reshape(out.shape)
            if task == "classify":
                return F.one_hot(y, out.shape[-1]).to(out.dtype)
            return y.reshape(out.shape)

        return lambda out, x, y: (out - target(out, x, y)).square().sum() / len(out)
    raise ValueError(f"loss: unknown kind {kind!r}; allowed: cross_entropy, bce, mse")


@dataclass
class Experiment:
    """The live pieces of a run.

    ``model`` is what the training step calls (the DDP wrapper under torchrun, compiled
    with ``compile``); ``module`` is the bare network (what checkpoints hold, and what
    evaluation runs).
    """

    config: ExperimentConfigBase
    device: torch.device
    data: Dataset
    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: LossFn
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def kfe(self) -> KFEOptimizer | None:
        return self.optimizer if isinstance(self.optimizer, KFEOptimizer) else None

    @property
    def true_fisher(self) -> bool:
        opt = self.kfe
        return opt is not None and opt.config.fisher == "true"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when it is there; asking for CUDA without it is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but no CUDA device is visible; use cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_data(config: ExperimentConfigBase, device: torch.device) -> Dataset:
    """The dataset, on ``device``; a missing source is a config error saying how to get it."""
    d = config.data
    try:
        data = load_dataset(
            d.name,
            d.data_dir,
            train_limit=d.train_limit,
            test_limit=d.test_limit,
            seed=config.seed,
        )
    except DatasetNotFound as exc:
        raise ConfigError(f"data.name: dataset {d.name!r} not found: {exc}") from None
    if d.batch_size > len(data.x_train):
        raise ConfigError(
            f"data.batch_size: {d.batch_size} exceeds the {len(data.x_train)} training examples"
        )
    return Dataset(
        data.name,
        data.x_train.to(device),
        data.y_train.to(device),
        data.x_test.to(device),
        data.y_test.to(device),
        data.num_classes,
    )


def build_optimizer(
    config: ExperimentConfigBase, module: nn.Module, registry: Registry | None
) -> torch.optim.Optimizer:
    section = config.optimizer_section
    if isinstance(section, TorchOptimizerConfig):
        return section.build(p for p in module.parameters() if p.requires_grad)
    return KFEOptimizer(module, kfe_settings(section), registry=registry)


def build_experiment(
    config: ExperimentConfigBase, registry: Registry | None = None, *, distributed: bool = True
) -> Experiment:
    """Seed, load data, build the network and its optimizer (and join torchrun's group).

    Under ``torchrun`` (``WORLD_SIZE`` set) the process group is initialised, the
    network is wrapped in ``DistributedDataParallel`` and each rank trains on its
    slice of every global batch.
    """
    rank, world = 0, 1
    if distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from kfe.distributed import init_from_env

        rank, world = init_from_env()
        if config.data.batch_size % world:
            raise ConfigError(
                f"data.batch_size: {config.data.batch_size} is not divisible by the "
                f"world size {world}"
            )
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    data = load_data(config, device)
    torch.manual_seed(config.seed)
    module = config.model_section.build(data.input_shape, data.num_classes).to(device)
    model: nn.Module = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(config, module, registry)
    if config.compile:
        # dynamo's default reuses a graph traced without kfe's hooks for a hooked module
        # of the same class (another run in this worker process): guard on hooks instead
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        model = cast(nn.Module, torch.compile(model))
    loss = loss_function(config.loss_kind, config.model_section.task)
    return Experiment(config, device, data, module, model, optimizer, loss, rank, world)


def describe(exp: Experiment) -> dict[str, Any]:
    """A one-line summary of the run for logs."""
    n_params = sum(p.numel() for p in exp.module.parameters())
    return {
        "label": exp.config.label,
        "dataset": exp.data.name,
        "train": len(exp.data.x_train),
        "model": exp.config.model_section.name,
        "params": n_params,
        "device": str(exp.device),
        "world_size": exp.world_size,
    }
