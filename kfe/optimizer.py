"""``KFEOptimizer``: a ``torch.optim.Optimizer`` that applies a diagonal rule in the KFE.

The step is one fixed pipeline for every tracked layer (no branch on the rule), run in
phases across blocks so that each statistic needs one collective under
``torch.distributed`` (:mod:`kfe.distributed`):

1. read the gradient as ``G`` of shape ``(d_out, d_in+1)`` (bias column last);
2. every ``factor_every`` steps, every block's batch factors ``A_batch``, ``B_batch``
   from this step's captured ``x``, ``g``; [one all-reduce: their mean over ranks];
   then each folds into its EMA factors ``A``, ``B``;
3. every ``basis_every`` steps, eigendecompose every factor (:func:`kfe.eigh.robust_eigh`),
   [each on its owner rank only, then one broadcast per owner]; then apply the rule's
   basis-change policy to its state;
4. every ``lambda_every`` steps (and at each refresh), compute the statistics the rule
   declared (``E_i[(U_B^T G_i U_A)^2]``) in the new basis; [one all-reduce];
5. per block, with ``weight_decay_style="l2"`` add ``wd * W`` to ``G``, then
   ``D = U_B rule(U_B^T G U_A) U_A^T`` (or the rule's parameter-space shortcut);
6. momentum on ``D`` and decoupled weight decay, as ``torch.optim.SGD`` / ``AdamW`` do;
   ``W <- W - lr * D``.

The bracketed collectives run only under ``torch.distributed`` with more than one rank;
blocks never interact, so the phase order computes exactly what a block-by-block loop
would. Parameters no adapter covers go through steps 1, 5, 6 with the fallback rule in
parameter space (the identity basis).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from kfe import state_keys as K
from kfe.basis import Eigenbasis
from kfe.block import LayerBlock, find_blocks
from kfe.capture import CurvatureCapture, LossKind, Reduction
from kfe.checks import all_finite, checked_params, checked_scale, finite_each
from kfe.config import KFEConfigBase, config_model, load_config
from kfe.distributed import Communicator, assign_owners, world
from kfe.eigh import Solved
from kfe.precision import fp32_matmul_precision
from kfe.profiling import phase
from kfe.refresh import fold_factors, solve_factor
from kfe.registry import Registry, default_registry
from kfe.rule import BasisPolicy, Rule, RuleContext, Statistic
from kfe.source import BasisSource
from kfe.state_dict import check_loadable, restore_state, state_kinds
from kfe.statistics import captures_sum_to, kfe_moments
from kfe.update import Update, apply_update, clip_kl

__all__ = ["KFEOptimizer"]


_FACTOR = {"A": K.FACTOR_A, "B": K.FACTOR_B}


def _per_example(job: _Job) -> list[tuple[Tensor, Tensor]]:
    """The job's ``(x, g)`` with ``g`` per-example (rescaled: a copy where the scale is
    not 1), as :meth:`kfe.BasisSource.batch_factors` takes them."""
    return [
        (x, g if s == 1 else g * s) for (x, g), s in zip(job.pairs, job.example_scales, strict=True)
    ]


_INSIDE = (__file__, os.path.dirname(torch.__file__) + os.sep)
"""Frames a warning from the step skips: this module's (only this module warns through
:meth:`KFEOptimizer._warn_once`) and torch's wrappers around ``step``."""


def _outside_level() -> int:
    """The ``stacklevel`` that makes a warning raised in this function's caller point at
    the first frame outside this module and the ``torch`` package: the line that called
    ``step`` (through torch's wrappers, a ``GradScaler`` or an LR scheduler's patch), in
    user code or in kfe's own loops; in a subclass that overrides ``step``, its call of
    ``super().step()``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _as_tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else value


@dataclass(eq=False)
class _Job:
    """One block's work in the current step, carried from phase to phase."""

    block: LayerBlock
    group: dict[str, Any]
    st: dict[str, Any]
    grad: Tensor
    """The gradient as ``(d_out, d_in[+1])`` (no L2 term: the factors never see it)."""
    pairs: list[tuple[Tensor, Tensor]]
    """This step's captured ``(x, g)``, ``x`` augmented and padded, ``g`` as stored (the
    mean loss's: per-example gradients are ``example_scales[p] * g``)."""
    example_scales: list[float]
    basis: Eigenbasis
    """The basis before this step's refresh."""
    refreshed: Eigenbasis | None = None
    """The new basis, if this step refreshed it."""
    old_fast: Eigenbasis | None = None
    """The zero-padded basis before the refresh, if it was cached (for rotations)."""
    squares: Tensor | None = None
    """A fresh ``E_i[(U_B^T G_i U_A)^2]`` (averaged over ranks), if this step made one."""
    projected: Tensor | None = None
    """``U_B^T grad U_A`` formed from the captures, if they are known to sum to ``grad``."""

    @property
    def current(self) -> Eigenbasis:
        return self.basis if self.refreshed is None else self.refreshed


class KFEOptimizer(torch.optim.Optimizer):
    """Diagonal rules in a Kronecker-factored eigenbasis (George et al., 2018).

    .. math::

        \\Delta W = -\\eta\\, U_B\\, \\mathrm{rule}(U_B^\\top \\nabla_W \\mathcal L\\, U_A)
        \\, U_A^\\top, \\qquad
        \\text{EKFAC: } \\mathrm{rule}(\\tilde M) = \\tilde M / (\\Lambda + \\lambda).

    Args:
        model: the module whose ``nn.Linear`` / ``nn.Conv2d`` (or plugin-supported)
            layers are tracked; hooks are attached to them.
        config: a config object, mapping, or YAML/JSON path (see :mod:`kfe.config`).
        params: optional parameters or parameter groups (as for any torch optimizer);
            default: every parameter of ``model`` that requires grad. A layer's weight
            and bias must be in the same group.
        registry: the plugin registry (default: installed ``kfe`` entry points).
        **settings: config fields, overriding ``config``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 2))
        >>> opt = KFEOptimizer(model, rule="ekfac", lr=1e-3, damping=1e-3)
        >>> loss = model(torch.randn(16, 4)).square().mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFEConfigBase | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        params: Iterable[Any] | None = None,
        registry: Registry | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: must be a torch.nn.Module, not {type(model).__name__}")
        self.registry = registry or default_registry()
        model_cls = config_model(self.registry)
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config, self.registry)
        if isinstance(config, KFEConfigBase):
            config = config.model_dump(exclude_unset=True)
        self.config = model_cls.model_validate({**(config or {}), **settings})
        self.rule: Rule[Any] = self.registry.rule(self.config.rule_config.name)(
            self.config.rule_config
        )
        self.fallback_rule: Rule[Any] = self.registry.rule(self.config.fallback_config.name)(
            self.config.fallback_config
        )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(checked_params(params), self.config.group_defaults())

        self.source: BasisSource = self.registry.basis(self.config.basis_config.name)(
            self.config.basis_config
        )
        all_params = {p for g in self.param_groups for p in g["params"]}
        self.blocks = find_blocks(model, self.registry, all_params, self.source)
        if not any(b.tracked for b in self.blocks) and self.source.needs_capture:
            kinds = ", ".join(sorted(t.__name__ for t in self.registry.adapters))
            raise ValueError(
                f"model {type(model).__name__} has no trainable layer of a supported type "
                f"({kinds}); register a layer adapter plugin for its layers"
            )
        if not self.blocks:
            raise ValueError(
                f"model {type(model).__name__} has no parameter the basis "
                f"{self.source.name!r} covers"
            )
        untracked = [b.name for b in self.blocks if not b.tracked]
        if untracked and self._wants_squares:
            raise ValueError(
                f"rule {self.rule.name!r} needs per-example statistics, which only layers "
                f"with an adapter have; basis {self.source.name!r} also covers {untracked}: "
                f"set basis={{'name': {self.source.name!r}, 'cover_untracked': False}} to "
                "give them the fallback rule"
            )
        self._block_of_weight = {b.weight: b for b in self.blocks}
        self._bias_params = {b.bias for b in self.blocks if b.bias is not None}
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for b in self.blocks:
            if len({group_of[p] for p in b.params}) != 1:
                raise ValueError(f"layer {b.name!r}: weight and bias must be in the same group")
        self.capture = CurvatureCapture(
            [b for b in self.blocks if b.tracked],
            fisher=self.config.fisher,
            batch_averaged=self.config.batch_averaged,
        )
        self._step = 0
        self._warned: set[str] = set()
        self._matmul_dtype: torch.dtype | None = (
            getattr(torch, self.config.matmul_dtype) if self.config.matmul_dtype else None
        )
        self._precision = self.config.fp32_matmul_precision
        self._padded: dict[LayerBlock, Eigenbasis] = {}
        """Zero-padded copies of each block's basis for fast matmuls; rebuilt at refresh."""
        self._probes: dict[int, Tensor] = {}
        """Probe vectors of :meth:`_gradients_in_captures`, by width."""
        self._block_index = {b: i for i, b in enumerate(self.blocks)}
        self._owner_plan: tuple[int, list[int]] | None = None
        self._comm: Communicator | None = None
        if world()[1] > 1:  # every rank builds the optimizer: a safe place for new_group
            self._comm = Communicator.resolve(self.config.comm_timeout_s)
        self.decompositions = 0
        """Factor eigendecompositions (one ``eigh`` or ``power_qr`` each) run by this rank."""
        self.decomposition_cost = 0
        """Their summed cost ``sum d^3`` (``d``: the side of each factor)."""
        self.gradients_from_captures = 0
        """Block updates whose ``U_B^T grad U_A`` came from the captures (the check of
        :meth:`_gradients_in_captures` passed) instead of rotating ``grad``."""
        self._arm_capture()

    # -- cadence ------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        return self._step % every == 0

    @property
    def _wants_squares(self) -> bool:
        return Statistic.SQUARED_PROJECTIONS in self.rule.needs

    def _arm_capture(self) -> None:
        cfg = self.config
        squares = self._wants_squares and (
            self._due(cfg.lambda_every) or self._due(cfg.basis_every)
        )
        factors = self.source.needs_capture and self._due(cfg.factor_every)
        self.capture.active = factors or squares

    @property
    def wants_statistics(self) -> bool:
        """Whether the coming step captures curvature (call :meth:`sample_fisher` then)."""
        return self.capture.active

    @property
    def steps_taken(self) -> int:
        """Number of completed (not skipped) optimizer steps."""
        return self._step

    # -- distribution -------------------------------------------------------------

    @property
    def communicator(self) -> Communicator:
        """The collectives in use, with their counts and times (inactive in one process).

        Resolved when the optimizer is built under an initialised process group, else at
        the first :meth:`step`.
        """
        return self._comm if self._comm is not None else Communicator()

    @property
    def eigh_owners(self) -> dict[tuple[str, str], int]:
        """The rank that decomposes each factor, keyed ``(block name, "A" | "B")``.

        A greedy balance of the ``d^3`` costs over the current world size
        (:func:`kfe.distributed.assign_owners`), the same on every rank; used with
        ``distributed_eigh="owner"`` (``"all"``: every rank decomposes every factor).
        """
        size = self._comm.world_size if self._comm is not None else world()[1]
        owners = self._owners(size)
        return {
            (b.name, side): owners[2 * i + j]
            for i, b in enumerate(self.blocks)
            for j, side in enumerate("AB")
        }

    def _owners(self, world_size: int) -> list[int]:
        """Owner rank of factor ``2 i`` (block ``i``'s ``A``) and ``2 i + 1`` (its ``B``)."""
        if self._owner_plan is None or self._owner_plan[0] != world_size:
            # block i's factors: A (side d_in[+1]) then B (side d_out)
            costs = [d**3 for b in self.blocks for d in reversed(b.shape)]
            self._owner_plan = (world_size, assign_owners(costs, world_size))
        return self._owner_plan[1]

    def sample_fisher(
        self,
        output: Tensor,
        kind: LossKind,
        generator: torch.Generator | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        """For ``fisher="true"``: capture ``g`` from labels sampled from the model.

        Call it after the forward pass and before ``loss.backward()``; it does nothing
        on steps that update no statistic, so it can be called every step::

            out = model(x)
            opt.sample_fisher(out, "cross_entropy")  # or "mse", "bce"
            F.cross_entropy(out, y).backward()
            opt.step()

        ``reduction`` is how the training loss combines each example's output terms:
        ``"mean"`` as torch's default losses do, ``"sum"`` for a loss summed over them
        (BCE summed over pixels); see :func:`kfe.capture.sample_loss`. A mismatch puts
        the true Fisher on another scale than the loss (by ``k^2`` for ``k`` terms).
        """
        with phase("kfe/capture"):
            self.capture.sample_fisher(output, kind, generator, reduction)

    # -- the torch.optim contract -------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients, and drop captures of a step that was never taken."""
        super().zero_grad(set_to_none)
        self.capture.clear()

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss_scale: float | None = None
    ) -> Any:
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss.

        Under DDP the gradients are already averaged, so every rank takes the same
        decision on a non-finite gradient (skip the step, touch nothing).

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            loss_scale: the factor the training loss was multiplied by before
                ``backward()``: a ``torch.amp.GradScaler``'s scale
                (``scaler.step(opt, loss_scale=scaler.get_scale())``; the scaler unscales
                ``.grad`` but cannot reach the captured output gradients), or ``1 / k``
                for ``(loss / k).backward()`` on each of ``k`` accumulated micro-batches.
                The captured output gradients are divided by it (empirical Fisher only:
                the true Fisher's come from :meth:`sample_fisher`'s own backward).
                Default: 1.
        """
        if loss_scale is not None:
            loss_scale = checked_scale(loss_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not all_finite(grads):
            self._warn_once("step", "non-finite gradient: step skipped, parameters unchanged")
            self.capture.clear()
            return loss
        if self._comm is None:
            self._comm = Communicator.resolve(self.config.comm_timeout_s)
        cfg = self.config
        unscale = 1.0 if loss_scale is None or cfg.fisher != "empirical" else 1 / loss_scale
        jobs, fallbacks = self._start_jobs(unscale)
        if self._due(cfg.factor_every):
            self._factor_phase(jobs)
        if self._due(cfg.basis_every):
            self._refresh_phase(jobs)
        if self._wants_squares:
            self._lambda_phase(jobs)
        # without KL clipping each update is applied at once (no direction outlives its
        # block); with it, every direction is needed first for the common factor
        pending: list[Update] = []
        hold = pending.append if cfg.kl_clip is not None else self._apply
        for job in jobs:
            hold(self._block_update(job))
        for p, group in fallbacks:
            with phase("kfe/fallback"):
                hold(self._fallback_step(p, group))
        if cfg.kl_clip is not None:
            clip_kl(pending, cfg.kl_clip)
            for update in pending:
                self._apply(update)
        self.capture.clear()
        self._step += 1
        self._arm_capture()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus a ``"kfe"`` entry: the step counter and the names of
        the rule, basis and fallback rule whose state it holds (:mod:`kfe.state_dict`)."""
        state = super().state_dict()
        state["kfe"] = {"step": self._step, **state_kinds(self.config)}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state exactly: tensors keep their dtype (factors are not cast). The
        state of another rule, basis or fallback, or of layers of another width, is
        refused before anything is replaced (:func:`kfe.state_dict.check_loadable`)."""
        state, groups = restore_state(state_dict, self.param_groups)
        saved = state_dict.get("kfe", {})
        check_loadable(self.blocks, state, ours=state_kinds(self.config), saved=saved)
        self.__setstate__({"state": state, "param_groups": groups})
        self._padded.clear()
        self._step = int(state_dict.get("kfe", {}).get("step", 0))
        self._arm_capture()

    # -- the pipeline -------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        """Warn once per ``key``, at the caller's line (:func:`_outside_level`)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=_outside_level())

    def _start_jobs(
        self, unscale: float = 1.0
    ) -> tuple[list[_Job], list[tuple[Tensor, dict[str, Any]]]]:
        """Blocks with a gradient (in parameter order) and the fallback parameters."""
        jobs, fallbacks = [], []
        for group in self.param_groups:
            for p in group["params"]:
                block = self._block_of_weight.get(p)
                if block is not None:
                    if any(q.grad is not None for q in block.params):
                        jobs.append(self._start(block, group, unscale))
                elif p.grad is not None and p not in self._bias_params:
                    fallbacks.append((p, group))
        return jobs, fallbacks

    def _start(self, block: LayerBlock, group: dict[str, Any], unscale: float = 1.0) -> _Job:
        """The block's gradient matrix and captures (its state created on first use).

        Captures are brought to the gradient's dtype (under autocast a layer sees and
        returns low-precision tensors while ``.grad`` is in the parameter's dtype) and
        their ``g`` multiplied by ``unscale`` (``1 / loss_scale``), a copy only where
        either applies."""
        st = self.state[block.weight]
        grad = block.matrix(
            *(torch.zeros_like(p) if p.grad is None else p.grad for p in block.params)
        )
        if not st:
            d_out, d_in = grad.shape
            st[K.BASIS] = dict(Eigenbasis.identity(d_out, d_in, grad)._asdict())
            st[K.RULE] = self.rule.state_to_dict(self.rule.init(grad))
            st[K.EIGH_FAILURES] = 0
            st[K.REFRESHES] = 0
        else:
            held = st[K.BASIS]["U_A"]
            if held.dtype != grad.dtype or held.device != grad.device:
                raise TypeError(
                    f"layer {block.name!r}: its gradient is {grad.dtype} on {grad.device}, the "
                    f"optimizer's state {held.dtype} on {held.device} (model.double() / .to() "
                    "after the optimizer's first step?): cast or move the model before building "
                    "the optimizer, or build a new one"
                )
        pairs = []
        if block.tracked:
            saw_input = bool(self.capture.captured[block].inputs)
            captured = self.capture.pop(block)
            if not captured and self.capture.active:
                self._warn_uncaptured(block, saw_input)
            dtype = grad.dtype
            pairs = [
                (
                    block.augment(x, dtype),
                    g.to(dtype) if unscale == 1 else g.to(dtype, copy=True).mul_(unscale),
                )
                for x, g in captured
            ]
        scales = [self.capture.example_scale(g) for _, g in pairs]
        return _Job(block, group, st, grad, pairs, scales, Eigenbasis(**st[K.BASIS]))

    def _warn_uncaptured(self, block: LayerBlock, saw_input: bool) -> None:
        """Warn (once per layer) that a layer whose weight has a gradient captured nothing
        on a statistics step: its basis and statistics then stay as they were."""
        if not saw_input:
            causes = [
                "zero_grad between forward and backward",
                "a forward that bypasses the module and uses its weight directly",
                "a torch.compile'd model traced before kfe hooked it: set "
                "torch._dynamo.config.skip_nnmodule_hook_guards = False, see "
                "docs/optimizer.md#torchcompile",
            ]
            if self.config.fisher == "true":
                causes.append(
                    "reentrant activation checkpointing, whose forward the true Fisher "
                    "cannot see (use_reentrant=False works)"
                )
            why = f"its forward hook saw no input since the last zero_grad ({'; '.join(causes)})"
        else:
            why = (
                "no output gradient arrived (with fisher='true', call "
                "opt.sample_fisher(output, kind) after the forward when "
                "opt.wants_statistics)"
            )
        self._warn_once(
            f"capture:{block.name}",
            f"layer {block.name!r} has a gradient but captured nothing on a statistics step: "
            f"{why}; its factors, basis and per-example statistics are not updated",
        )

    # phase 2: factors

    def _factor_phase(self, jobs: list[_Job]) -> None:
        """Batch factors of every block, averaged over ranks if they come from local
        data (captures; Shampoo's come from the already averaged gradient), then the EMAs.
        """
        with phase("kfe/factors"):
            found = [self.source.batch_factors(job.grad, _per_example(job)) for job in jobs]
        comm = self.communicator
        if comm.active and self.source.needs_capture:
            found = self._average(
                jobs,
                found,
                lambda g: [(g.shape[1], g.shape[1]), (g.shape[0], g.shape[0])],
                "factor statistics",
            )
        with phase("kfe/factors"):
            for job, factors in zip(jobs, found, strict=True):
                if factors is not None:
                    self._fold_factors(job.block, job.st, factors[0], factors[1])

    def _fold_factors(self, block: LayerBlock, st: dict[str, Any], A: Tensor, B: Tensor) -> None:
        """:func:`kfe.refresh.fold_factors`, warning once per layer where the batch factors
        are not finite (checked after the reduction: every rank decides alike)."""
        cfg = self.config
        if not fold_factors(st, A, B, cfg.factor_decay, cfg.factor_init):
            self._warn_once(
                f"factors:{block.name}",
                f"layer {block.name!r}: non-finite factor statistics skipped",
            )

    def _average(
        self,
        jobs: list[_Job],
        local: list[Any],
        shapes: Callable[[Tensor], list[tuple[int, ...]]],
        what: str,
    ) -> list[Any]:
        """Mean over ranks of one statistic of every job, in one bucketed all-reduce.

        ``local[k]`` is a tensor or tuple of tensors with the shapes ``shapes(grad)``,
        or ``None`` where this rank has none (zeros are sent, and the mean is over the
        ranks that had it). The buffer is in the gradient's dtype; results come back in
        the local statistic's dtype.
        """
        entries = []
        for job, value in zip(jobs, local, strict=True):
            if value is None:
                tensors = [job.grad.new_zeros(shape) for shape in shapes(job.grad)]
            else:
                tensors = [t.to(job.grad.dtype) for t in _as_tuple(value)]
            entries.append((tensors, value is not None))
        averaged = self.communicator.average(entries, what=what, step=self._step)
        out: list[Any] = []
        for value, mean in zip(local, averaged, strict=True):
            if mean is None:
                out.append(None)
                continue
            if value is not None:
                mean = [m.to(t.dtype) for m, t in zip(mean, _as_tuple(value), strict=True)]
            out.append(mean[0] if isinstance(value, Tensor) or len(mean) == 1 else tuple(mean))
        return out

    # phase 3: refresh

    def _refresh_phase(self, jobs: list[_Job]) -> None:
        """Eigendecompose both factors of every block that has them, then adopt the new
        bases (or keep the old one of a block where either failed).

        Under ``torch.distributed`` with ``distributed_eigh="owner"``, each factor is
        solved on its owner rank and the outcome (success, eigenvalues, aligned
        eigenvectors) broadcast, so every rank adopts bitwise the same bases and counts.
        """
        due = [job for job in jobs if K.FACTOR_A in job.st]
        if not due:
            return
        tasks = [(job, side) for job in due for side in ("B", "A")]
        comm = self.communicator
        if comm.active and self.config.distributed_eigh == "owner":
            owners = self._owners(comm.world_size)
            factors = [job.st[_FACTOR[side]] for job, side in tasks]

            def solve(k: int) -> Solved:
                with phase("kfe/eigh"):
                    return self._solve(*tasks[k])

            solved = comm.broadcast_from_owners(
                [f.shape[0] for f in factors],
                factors,
                [owners[2 * self._block_index[job.block] + (side == "B")] for job, side in tasks],
                solve,
                what="eigenbases",
                step=self._step,
            )
        else:
            with phase("kfe/eigh"):
                solved = [self._solve(job, side) for job, side in tasks]
        with phase("kfe/eigh"):
            for i, job in enumerate(due):
                job.refreshed = self._adopt(job, solved[2 * i], solved[2 * i + 1])

    def _solve(self, job: _Job, side: str) -> Solved:
        """``(values, vectors)`` of one factor (``"A"`` or ``"B"``), or ``None`` on failure
        (:func:`kfe.refresh.solve_factor`): ``power_qr`` from the second refresh on if
        configured, else ``eigh``, realigned to the old eigenvectors unless the rule resets
        its state anyway."""
        factor = job.st[_FACTOR[side]]
        cfg = self.config
        self.decompositions += 1
        self.decomposition_cost += factor.shape[0] ** 3
        return solve_factor(
            factor,
            job.basis.U_B if side == "B" else job.basis.U_A,
            warm=cfg.eigensolver == "power_qr" and job.st[K.REFRESHES] > 0,
            dtype=getattr(torch, cfg.eigh_dtype) if cfg.eigh_dtype else None,
            align=self.rule.policy is not BasisPolicy.RESET,
        )

    def _adopt(self, job: _Job, found_b: Solved, found_a: Solved) -> Eigenbasis | None:
        """Store the new basis; ``None`` (and the old basis kept, counted) on failure."""
        st, block = job.st, job.block
        if found_a is None or found_b is None:
            st[K.EIGH_FAILURES] += 1
            self._warn_once(
                f"eigh:{block.name}",
                f"layer {block.name!r}: eigendecomposition failed; keeping the previous basis",
            )
            return None
        (b, U_B), (a, U_A) = found_b, found_a
        new = Eigenbasis(U_B=U_B, b=b, U_A=U_A, a=a)
        st[K.BASIS] = dict(new._asdict())
        if K.FACTOR_PRIOR in st:
            st[K.BASIS_PRIOR] = st[K.FACTOR_PRIOR]
        st[K.REFRESHES] += 1
        job.old_fast = self._padded.pop(block, None)
        return new

    def _fast(self, job: _Job) -> Eigenbasis | None:
        """The zero-padded current basis, or ``None`` before the block's first successful
        refresh (always, for the identity source): rotations are then skipped."""
        if not job.st[K.REFRESHES]:
            return None
        fast = self._padded.get(job.block)
        if fast is None:
            fast = self._padded[job.block] = job.current.padded(self._matmul_dtype)
        return fast

    # phase 4: per-example statistics

    def _lambda_phase(self, jobs: list[_Job]) -> None:
        """The rule's squared projections, in the new basis, where due: every
        ``lambda_every`` steps and at each refresh (averaged over ranks; non-finite ones
        are dropped after the reduction, so every rank decides alike)."""
        due = [
            job
            for job in jobs
            if job.block.tracked
            and (self._due(self.config.lambda_every) or job.refreshed is not None)
        ]
        if not due:
            return
        found: list[Tensor | None] = []
        with phase("kfe/lambda"):
            reusable = [job for job in due if job.pairs and self._fast(job) is not None]
            in_captures = dict(zip(reusable, self._gradients_in_captures(reusable), strict=True))
        for job in due:
            fast = self._fast(job)
            squares = None
            if job.pairs:
                with phase("kfe/lambda"), fp32_matmul_precision(self._precision):
                    moments = kfe_moments(
                        self._lowered(job.pairs),
                        fast.U_B if fast else None,
                        fast.U_A if fast else None,
                        d_in=job.grad.shape[1],
                        chunk_bytes=self.config.lambda_chunk_mb * 2**20,
                        gradient=in_captures.get(job, False),
                        example_scales=job.example_scales,
                    )
                dtype = job.grad.dtype  # the moments come in matmul_dtype
                squares = moments.squares.to(dtype)
                job.projected = None if moments.gradient is None else moments.gradient.to(dtype)
            found.append(squares)
        if self.communicator.active:
            found = self._average(due, found, lambda g: [tuple(g.shape)], "squared projections")
        finite = finite_each(found)
        for job, squares, ok in zip(due, found, finite, strict=True):
            if squares is not None and not ok:
                self._warn_once(
                    f"lambda:{job.block.name}",
                    f"layer {job.block.name!r}: non-finite per-example statistics skipped",
                )
                squares = None
            job.squares = squares

    def _lowered(self, pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """The captured pairs in ``matmul_dtype`` for Lambda (themselves when none is set;
        the factors and the capture check read the pairs as captured)."""
        dtype = self._matmul_dtype
        if dtype is None:
            return pairs
        return [(x.to(dtype), g.to(dtype)) for x, g in pairs]

    def _gradients_in_captures(self, jobs: list[_Job]) -> list[bool]:
        """Per job, whether ``grad = sum_p g_p^T x_p`` over its captured pairs (``g`` as the
        capture stores it, the gradient of the loss as computed); one host sync for all
        jobs.

        Then the Lambda phase can hand the rule ``U_B^T grad U_A`` from the rotated
        captures it forms anyway (:func:`kfe.statistics.kfe_moments`), saving the two
        rotations of ``grad``. It holds in a plain loop (one or more forwards, one
        backward, batch-mean or summed loss) and not when anything else touched
        ``.grad``: gradient clipping, accumulation over steps, DDP's averaging, other
        loss terms on the weights, the true Fisher's sampled labels, ``l2`` decay. So
        it is checked, not assumed: along a fixed pseudo-random direction ``r``,
        ``grad r`` must equal ``sum_p g_p^T (x_p r)`` to ``1e-5`` relative (three
        matrix-vector products, on the captures as captured: before any ``matmul_dtype``
        rounding); otherwise ``grad`` itself is rotated, as always.
        """
        cfg = self.config
        if not jobs or self.communicator.active or cfg.fisher != "empirical":
            return [False] * len(jobs)
        out = [False] * len(jobs)
        candidates: list[int] = []
        checks: list[Tensor] = []
        for k, job in enumerate(jobs):
            if job.group["weight_decay"] and cfg.weight_decay_style == "l2":
                continue
            grad = job.grad
            probe = self._probes.get(grad.shape[1])
            if probe is None or probe.device != grad.device or probe.dtype != grad.dtype:
                g = torch.Generator().manual_seed(grad.shape[1])
                probe = torch.randn(grad.shape[1], generator=g, dtype=torch.float64)
                probe = self._probes[grad.shape[1]] = probe.to(grad.device, grad.dtype)
            candidates.append(k)
            checks.append(captures_sum_to(grad, job.pairs, probe))
        if checks:
            for k, ok in zip(candidates, torch.stack(checks).tolist(), strict=True):
                out[k] = ok
                self.gradients_from_captures += ok
        return out

    # phase 5, 6: rule and update

    def _block_update(self, job: _Job) -> Update:
        """Project, apply the rule (after its basis-change policy at a refresh), project
        back; returns what :func:`kfe.update.apply_update` needs."""
        cfg, st, group, block = self.config, job.st, job.group, job.block
        grad = job.grad
        if group["weight_decay"] and cfg.weight_decay_style == "l2":
            grad = grad.add(block.matrix(*block.params), alpha=group["weight_decay"])
        fast = self._fast(job)
        rule_state = self.rule.state_from_dict(st[K.RULE])
        ctx = self._context(group, job.current, job.squares, st.get(K.BASIS_PRIOR))
        if job.refreshed is not None:
            rule_state = self._change_basis(rule_state, job, grad, ctx)
        with fp32_matmul_precision(self._precision):
            with phase("kfe/rule"):
                # the shortcut multiplies by the rule's own state (e.g. factor inverses) in
                # the parameters' dtype, which matmul_dtype cannot reach: with it, the
                # lowered KFE path is faster (fp32_matmul_precision lowers both)
                shortcut = (
                    None
                    if self._matmul_dtype is not None
                    else self.rule.precondition(grad, rule_state, ctx)
                )
            if shortcut is not None:
                direction, rule_state = shortcut
            else:
                with phase("kfe/project"):
                    projected = job.projected
                    if projected is None:
                        projected = fast.project(grad) if fast else grad
                with phase("kfe/rule"):
                    projected, rule_state = self.rule.update(projected, rule_state, ctx)
                with phase("kfe/unproject"):
                    direction = fast.unproject(projected) if fast else projected
        st[K.RULE] = self.rule.state_to_dict(rule_state)
        return Update(st, group, direction, block.params, block.split, grad)

    def _change_basis(self, rule_state: Any, job: _Job, like: Tensor, ctx: RuleContext) -> Any:
        """Apply the rule's basis-change policy, then its ``on_refresh`` hook.

        ``rotate`` maps each rotatable moment ``M`` to ``R_B^T M R_A`` with
        ``R = U^T U'``, or through parameter space where that is cheaper
        (:meth:`Eigenbasis.rotator_to`), on the zero-padded bases (exact, see
        :func:`kfe.basis.chain`).
        """
        policy = self.rule.policy.value
        if policy == "reset":
            rule_state = self.rule.reset(rule_state, like, ctx)
        elif policy == "rotate" and self.rule.rotatable:
            old = job.old_fast or job.basis.padded(self._matmul_dtype)
            fields = [f for f in self.rule.rotatable if getattr(rule_state, f) is not None]
            with phase("kfe/rotate"), fp32_matmul_precision(self._precision):
                rotate = old.rotator_to(cast(Eigenbasis, self._fast(job)), len(fields))
                # contiguous, as a resumed run holds them (loaded tensors are dense): a
                # strided view would reach BLAS with another leading dimension, and the
                # result could differ in the last bit from the uninterrupted run's
                rule_state = rule_state._replace(
                    **{f: rotate(getattr(rule_state, f)).contiguous() for f in fields}
                )
        return self.rule.on_refresh(rule_state, ctx)

    def _fallback_step(self, p: Tensor, group: dict[str, Any]) -> Update:
        st = self.state[p]
        grad = cast(Tensor, p.grad)
        if not st:
            st[K.RULE] = self.fallback_rule.state_to_dict(self.fallback_rule.init(grad))
        if group["weight_decay"] and self.config.weight_decay_style == "l2":
            grad = grad.add(p, alpha=group["weight_decay"])
        rule_state = self.fallback_rule.state_from_dict(st[K.RULE])
        direction, rule_state = self.fallback_rule.update(grad, rule_state, RuleContext(group))
        st[K.RULE] = self.fallback_rule.state_to_dict(rule_state)
        return Update(st, group, direction, [p], lambda d: [d], grad)

    def _apply(self, update: Update) -> None:
        """Momentum, weight decay and ``p -= lr * d`` (:func:`kfe.update.apply_update`)."""
        apply_update(update, decoupled_decay=self.config.weight_decay_style == "decoupled")

    # -- inspection ---------------------------------------------------------------

    def block(self, layer: str | nn.Module) -> LayerBlock:
        """The tracked block of a layer, by module name (as in ``named_modules``) or module."""
        for b in self.blocks:
            if b.name == layer or b.module is layer:
                return b
        names = ", ".join(b.name for b in self.blocks)
        raise KeyError(f"{layer!r} is not a tracked layer; tracked: {names}")

    def rule_context(self, block: LayerBlock) -> RuleContext:
        """The context the rule would see for ``block`` now (no fresh statistics)."""
        st = self.state[block.weight]
        group = next(g for g in self.param_groups if any(p is block.weight for p in g["params"]))
        return self._context(group, Eigenbasis(**st[K.BASIS]), None, st.get(K.BASIS_PRIOR))

    def _context(
        self,
        group: Mapping[str, Any],
        basis: Eigenbasis,
        squares: Tensor | None,
        prior: tuple[float, float] | None,
    ) -> RuleContext:
        """What the rule sees: eigenvalues (and ``factor_init``'s part of them, as
        ``(s_B, s_A)`` like ``(b, a)``) only where the source has Fisher ones."""
        if not self.source.fisher_eigenvalues:
            return RuleContext(group, None, squares, (basis.U_B, basis.U_A))
        prior_ba = None if prior is None else (prior[1], prior[0])
        return RuleContext(group, (basis.b, basis.a), squares, (basis.U_B, basis.U_A), prior_ba)
