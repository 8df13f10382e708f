"""``KFEOptimizer``: a ``torch.optim.Optimizer`` that applies a diagonal rule in the KFE.

The step is one fixed pipeline for every tracked layer (no branch on the rule):

1. read the gradient as ``G`` of shape ``(d_out, d_in+1)`` (bias column last);
   with ``weight_decay_style="l2"`` add ``wd * W``;
2. every ``factor_every`` steps, fold this step's captured ``x``, ``g`` into the EMA
   factors ``A``, ``B``;
3. every ``basis_every`` steps, eigendecompose them (:func:`kfe.eigh.robust_eigh`) and
   apply the rule's basis-change policy to its state;
4. every ``lambda_every`` steps (and at each refresh), compute the statistics the rule
   declared (``E_i[(U_B^T G_i U_A)^2]``);
5. ``D = U_B rule(U_B^T G U_A) U_A^T`` (or the rule's parameter-space shortcut);
6. momentum on ``D`` and decoupled weight decay, as ``torch.optim.SGD`` / ``AdamW`` do;
   ``W <- W - lr * D``.

Parameters no adapter covers go through the same steps 1, 5, 6 with the fallback rule
in parameter space (the identity basis).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from kfe import state_keys as K
from kfe.basis import Eigenbasis
from kfe.block import LayerBlock
from kfe.capture import CurvatureCapture, LossKind
from kfe.config import KFEConfigBase, config_model
from kfe.eigh import power_qr, robust_eigh
from kfe.registry import Registry, default_registry
from kfe.rule import BasisPolicy, Rule, RuleContext, Statistic
from kfe.source import BasisSource
from kfe.statistics import squared_projections

__all__ = ["KFEOptimizer"]


def find_blocks(
    model: nn.Module, registry: Registry, params: set[nn.Parameter], source: BasisSource
) -> list[LayerBlock]:
    """The blocks of ``model``: layers with an adapter whose weight is optimised, then
    (if ``source`` covers them) every other optimised parameter with at least two dims."""
    blocks = []
    for name, module in model.named_modules():
        adapter = registry.adapter_for(module)
        if adapter is None or adapter.supports(module) is not None:
            continue
        weight, bias = adapter.weight(module), adapter.bias(module)
        if weight not in params:
            continue
        if bias is not None and bias not in params:
            bias = None  # a frozen bias is a constant shift, not a parameter of the block
        blocks.append(LayerBlock(name or type(module).__name__, module, adapter, weight, bias))
    if source.covers_untracked:
        taken = {p for b in blocks for p in b.params}
        for name, p in model.named_parameters():
            if p in params and p not in taken and p.dim() >= 2:
                blocks.append(LayerBlock(name, None, None, p, None))
    return blocks


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite, with one host sync: NaN and inf propagate through
    sums, the cheapest reduction (a finite tensor whose sum overflows counts as not)."""
    sums = [t.sum() if t.element_size() >= 4 else t.sum(dtype=torch.float32) for t in tensors]
    return bool(torch.stack([s.double() for s in sums]).sum().isfinite())


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
        config: KFEConfigBase | Mapping[str, Any] | None = None,
        *,
        params: Iterable[Any] | None = None,
        registry: Registry | None = None,
        **settings: Any,
    ) -> None:
        self.registry = registry or default_registry()
        model_cls = config_model(self.registry)
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
        super().__init__(params, self.config.group_defaults())

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
        self._padded: dict[LayerBlock, Eigenbasis] = {}
        """Zero-padded copies of each block's basis for fast matmuls; rebuilt at refresh."""
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
        self.capture.active = self._due(cfg.factor_every) or squares

    @property
    def wants_statistics(self) -> bool:
        """Whether the coming step captures curvature (call :meth:`sample_fisher` then)."""
        return self.capture.active

    @property
    def steps_taken(self) -> int:
        """Number of completed (not skipped) optimizer steps."""
        return self._step

    def sample_fisher(
        self, output: Tensor, kind: LossKind, generator: torch.Generator | None = None
    ) -> None:
        """For ``fisher="true"``: capture ``g`` from labels sampled from the model.

        Call it after the forward pass and before ``loss.backward()``; it does nothing
        on steps that update no statistic, so it can be called every step::

            out = model(x)
            opt.sample_fisher(out, "cross_entropy")  # or "mse", "bce"
            F.cross_entropy(out, y).backward()
            opt.step()
        """
        with record_function("kfe/capture"):
            self.capture.sample_fisher(output, kind, generator)

    # -- the torch.optim contract -------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients, and drop captures of a step that was never taken."""
        super().zero_grad(set_to_none)
        self.capture.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not _all_finite(grads):
            self._warn_once("step", "non-finite gradient: step skipped, parameters unchanged")
            self.capture.clear()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                block = self._block_of_weight.get(p)
                if block is not None:
                    if any(q.grad is not None for q in block.params):
                        self._block_step(block, group)
                elif p.grad is not None and p not in self._bias_params:
                    with record_function("kfe/fallback"):
                        self._fallback_step(p, group)
        self.capture.clear()
        self._step += 1
        self._arm_capture()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus a ``"kfe"`` entry with the step counter."""
        state = super().state_dict()
        state["kfe"] = {"step": self._step}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state exactly: tensors keep their dtype (factors are not cast)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("loaded state dict does not match this optimizer's parameter groups")
        id_map = dict(
            zip(
                chain.from_iterable(s["params"] for s in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )

        def copy(value: Any, device: torch.device) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone().to(device)
            if isinstance(value, Mapping):
                return {k: copy(v, device) for k, v in value.items()}
            return value

        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            param = id_map[key]
            state[param] = copy(value, param.device)
        groups = [
            {**saved, "params": group["params"]}
            for saved, group in zip(saved_groups, self.param_groups, strict=True)
        ]
        self.__setstate__({"state": state, "param_groups": groups})
        self._padded.clear()
        self._step = int(state_dict.get("kfe", {}).get("step", 0))
        self._arm_capture()

    # -- the pipeline -------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _block_step(self, block: LayerBlock, group: dict[str, Any]) -> None:
        cfg = self.config
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

        pairs = []
        if block.tracked:
            pairs = [(block.augment(x), g) for x, g in self.capture.pop(block)]
        if self._due(cfg.factor_every):
            with record_function("kfe/factors"):
                self._update_factors(block, st, grad, pairs)
        if group["weight_decay"] and cfg.weight_decay_style == "l2":
            grad = grad.add(block.matrix(*block.params), alpha=group["weight_decay"])
        basis = Eigenbasis(**st[K.BASIS])
        rule_state = self.rule.state_from_dict(st[K.RULE])
        previous, refreshed = basis, None
        if self._due(cfg.basis_every) and K.FACTOR_A in st:
            with record_function("kfe/eigh"):
                refreshed = self._refresh(block, st, previous)
        if refreshed is not None:
            basis = refreshed
            self._padded.pop(block, None)
        # before its first successful refresh (always, for the identity source) a block's
        # basis is the identity: rotations are skipped, not multiplied out
        fast = None
        if st[K.REFRESHES]:
            fast = self._padded.get(block)
            if fast is None:
                fast = self._padded[block] = basis.padded()

        squares = None
        if self._wants_squares and pairs and (self._due(cfg.lambda_every) or refreshed):
            with record_function("kfe/lambda"):
                squares = squared_projections(
                    pairs,
                    fast.U_B if fast else None,
                    fast.U_A if fast else None,
                    d_in=grad.shape[1],
                    chunk_bytes=cfg.lambda_chunk_mb * 2**20,
                )
            if not torch.isfinite(squares).all():
                self._warn_once(
                    f"lambda:{block.name}",
                    f"layer {block.name!r}: non-finite per-example statistics skipped",
                )
                squares = None
        ctx = self._context(group, basis, squares)
        if refreshed is not None:
            rule_state = self._change_basis(rule_state, previous, refreshed, grad, ctx)
        with record_function("kfe/rule"):
            shortcut = self.rule.precondition(grad, rule_state, ctx)
        if shortcut is not None:
            direction, rule_state = shortcut
        else:
            with record_function("kfe/project"):
                projected = fast.project(grad) if fast else grad
            with record_function("kfe/rule"):
                projected, rule_state = self.rule.update(projected, rule_state, ctx)
            with record_function("kfe/unproject"):
                direction = fast.unproject(projected) if fast else projected
        st[K.RULE] = self.rule.state_to_dict(rule_state)
        self._apply(st, group, direction, block.params, block.split)

    def _update_factors(
        self,
        block: LayerBlock,
        st: dict[str, Any],
        grad: Tensor,
        pairs: list[tuple[Tensor, Tensor]],
    ) -> None:
        found = self.source.batch_factors(grad, pairs)
        if found is None:
            return
        A, B = found
        # Gram matrices: |A_jk| <= sqrt(A_jj A_kk), so finite diagonals mean finite factors
        if not bool(torch.cat([A.diagonal(), B.diagonal()]).isfinite().all()):
            self._warn_once(
                f"factors:{block.name}",
                f"layer {block.name!r}: non-finite factor statistics skipped",
            )
            return
        if K.FACTOR_A not in st:
            st[K.FACTOR_A], st[K.FACTOR_B] = A.contiguous(), B.contiguous()
        else:
            weight = 1 - self.config.factor_decay
            st[K.FACTOR_A].lerp_(A, weight)
            st[K.FACTOR_B].lerp_(B, weight)

    def _refresh(
        self, block: LayerBlock, st: dict[str, Any], previous: Eigenbasis
    ) -> Eigenbasis | None:
        """Eigendecompose both factors; ``None`` (and the old basis kept) on failure.

        Unless the rule resets its state, the new eigenvectors are reordered to follow
        the old ones they overlap most (:meth:`Eigenbasis.aligned_to`), so state indexed
        by eigenvector stays with its eigenvector when ``eigh`` re-sorts.
        """
        warm = self.config.eigensolver == "power_qr" and st[K.REFRESHES] > 0
        if warm:
            found_b = power_qr(st[K.FACTOR_B], previous.U_B)
            found_a = power_qr(st[K.FACTOR_A], previous.U_A)
        else:
            dtype = getattr(torch, self.config.eigh_dtype) if self.config.eigh_dtype else None
            found_b = robust_eigh(st[K.FACTOR_B], dtype)
            found_a = robust_eigh(st[K.FACTOR_A], dtype)
        if found_a is None or found_b is None:
            st[K.EIGH_FAILURES] += 1
            self._warn_once(
                f"eigh:{block.name}",
                f"layer {block.name!r}: eigendecomposition failed; keeping the previous basis",
            )
            return None
        (b, U_B), (a, U_A) = found_b, found_a
        new = Eigenbasis(U_B=U_B, b=b, U_A=U_A, a=a)
        if not warm and self.rule.policy is not BasisPolicy.RESET:
            new = new.aligned_to(previous)
        st[K.BASIS] = dict(new._asdict())
        st[K.REFRESHES] += 1
        return new

    def _change_basis(
        self, rule_state: Any, old: Eigenbasis, new: Eigenbasis, like: Tensor, ctx: RuleContext
    ) -> Any:
        """Apply the rule's basis-change policy, then its ``on_refresh`` hook."""
        policy = self.rule.policy.value
        if policy == "reset":
            rule_state = self.rule.reset(rule_state, like, ctx)
        elif policy == "rotate":
            R_B, R_A = old.rotation_to(new)
            rule_state = rule_state._replace(
                **{
                    f: R_B.mT @ getattr(rule_state, f) @ R_A
                    for f in self.rule.rotatable
                    if getattr(rule_state, f) is not None
                }
            )
        return self.rule.on_refresh(rule_state, ctx)

    def _fallback_step(self, p: Tensor, group: dict[str, Any]) -> None:
        st = self.state[p]
        grad = cast(Tensor, p.grad)
        if not st:
            st[K.RULE] = self.fallback_rule.state_to_dict(self.fallback_rule.init(grad))
        if group["weight_decay"] and self.config.weight_decay_style == "l2":
            grad = grad.add(p, alpha=group["weight_decay"])
        rule_state = self.fallback_rule.state_from_dict(st[K.RULE])
        direction, rule_state = self.fallback_rule.update(grad, rule_state, RuleContext(group))
        st[K.RULE] = self.fallback_rule.state_to_dict(rule_state)
        self._apply(st, group, direction, [p], lambda d: [d])

    def _apply(
        self,
        st: dict[str, Any],
        group: Mapping[str, Any],
        direction: Tensor,
        params: list[nn.Parameter] | list[Tensor],
        split: Callable[[Tensor], list[Tensor]],
    ) -> None:
        """Momentum and weight decay around the rule, then ``p -= lr * d``.

        Follows ``torch.optim.SGD`` op for op (momentum buffer cloned on the first step,
        ``buf = mu * buf + (1 - dampening) * d``, Nesterov ``d + mu * buf``), and
        ``torch.optim.AdamW`` for decoupled decay (``p *= 1 - lr * wd`` first).
        ``split`` maps the direction onto ``params`` (a block's weight and bias).
        """
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if mu:
            buf = st.get(K.MOMENTUM)
            if buf is None:
                buf = st[K.MOMENTUM] = torch.clone(direction).detach()
            else:
                buf.mul_(mu).add_(direction, alpha=1 - group["dampening"])
            direction = direction.add(buf, alpha=mu) if group["nesterov"] else buf
        for p, d in zip(params, split(direction), strict=True):
            if wd and self.config.weight_decay_style == "decoupled":
                p.mul_(1 - lr * wd)
            p.add_(d, alpha=-lr)

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
        basis = Eigenbasis(**self.state[block.weight][K.BASIS])
        group = next(g for g in self.param_groups if any(p is block.weight for p in g["params"]))
        return self._context(group, basis, None)

    def _context(
        self, group: Mapping[str, Any], basis: Eigenbasis, squares: Tensor | None
    ) -> RuleContext:
        """What the rule sees: eigenvalues only where the source has Fisher ones."""
        eigenvalues = (basis.b, basis.a) if self.source.fisher_eigenvalues else None
        return RuleContext(group, eigenvalues, squares, (basis.U_B, basis.U_A))
