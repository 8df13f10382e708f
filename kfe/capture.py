"""Curvature capture: layer inputs and pre-activation gradients, on statistic steps only.

A forward hook on each tracked module stores its input (as ``(n, T, d_in)``). Under the
*empirical* Fisher it also puts a tensor hook on the module output, so the ordinary
``loss.backward()`` hands over ``dL/dh``; under the *true* (Monte Carlo) Fisher the
gradient comes from :meth:`CurvatureCapture.sample_fisher`, one extra backward through
a loss on labels sampled from the model's predictive distribution.

Scaling. Frameworks give the gradient of the *mean* batch loss
``L = (1/n) sum_i l_i``, i.e. ``g_i / n``. The capture stores that gradient as it comes
(no copy); the per-example gradient is ``g_i = dl_i/dh_i = s * stored`` with
``s = n`` under ``batch_averaged=True`` (the default) and ``s = 1`` for a summed loss
(``batch_averaged=False``): :meth:`CurvatureCapture.example_scale`. Consumers fold ``s``
into their matmuls (``s^2`` for second moments), and in either case ``.grad`` of the
weight is ``sum_p stored_p^T x_p``.

When the hooks are idle (steps that update no statistic) a forward costs one Python
attribute check per tracked module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kfe.block import LayerBlock
from kfe.profiling import phase

__all__ = ["Captured", "CurvatureCapture", "LossKind", "Reduction", "sample_loss"]

LossKind = Literal["cross_entropy", "mse", "bce"]
Reduction = Literal["mean", "sum"]
"""How the training loss combines one example's output terms (:func:`sample_loss`)."""


@dataclass
class Captured:
    """What one block captured in the current step (several forwards are stacked)."""

    inputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    """Slot ``k`` holds the gradient of forward ``k`` (backward visits them in any order)."""
    outputs: list[Tensor] = field(default_factory=list)
    recomputed: list[bool] = field(default_factory=list)
    """Slot ``k`` was recorded inside a backward pass (reentrant checkpointing)."""

    def awaits_forward_gradient(self) -> bool:
        """A forward recorded outside backward still waits for its gradient."""
        return any(g is None and not r for g, r in zip(self.grads, self.recomputed, strict=True))

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(x, g)`` pairs, each ``(n, T, d)``, of the forwards whose gradient arrived."""
        return [(x, g) for x, g in zip(self.inputs, self.grads, strict=True) if g is not None]


def check_loss(kind: str, reduction: str) -> None:
    """Raise a ``ValueError`` naming the field if ``kind`` or ``reduction`` is unknown."""
    if kind not in get_args(LossKind):
        raise ValueError(f"kind: must be one of 'cross_entropy', 'mse', 'bce', not {kind!r}")
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction: must be 'mean' or 'sum', not {reduction!r}")


def check_output(output: object, kind: str) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``output`` if it is not a tensor of a
    shape ``kind`` can sample from (``(n, ...)``; ``(n, ..., C)`` for ``cross_entropy``)."""
    if not isinstance(output, Tensor):
        raise TypeError(f"output: must be the model's output tensor, not {type(output).__name__}")
    need = 2 if kind == "cross_entropy" else 1
    if output.dim() < need:
        shape = "(n, C) or (n, T, C) logits" if need == 2 else "(n, ...) with a batch dim"
        raise ValueError(f"output: kind {kind!r} needs {shape}, got shape {tuple(output.shape)}")


def sample_loss(
    output: Tensor,
    kind: LossKind,
    generator: torch.Generator | None,
    reduction: Reduction = "mean",
    batch_mean: bool = True,
) -> Tensor:
    """The training loss on labels sampled from the model's predictive distribution.

    Each output term is torch's own loss with ``reduction="none"``:

    - ``cross_entropy``: ``y ~ Categorical(softmax(output))`` over the last dim
      (``(n, C)`` or ``(n, T, C)`` logits), terms ``F.cross_entropy``;
    - ``bce``: ``y ~ Bernoulli(sigmoid(output))``, terms
      ``F.binary_cross_entropy_with_logits``;
    - ``mse``: ``y ~ N(output, I/2)``, terms ``F.mse_loss``, i.e. ``(f - y)^2``: the
      Gaussian whose negative log-likelihood is ``(f - y)^2`` (variance 1/2), so that
      ``E[g g^T] = 2 I`` is the Hessian of the term (the GGN).

    ``reduction`` says how the training loss combines an example's terms (positions,
    pixels): ``"mean"`` (torch's default losses; with ``batch_mean`` this is the mean
    over every element, torch's ``reduction="mean"``) or ``"sum"`` (the example's whole
    negative log-likelihood, e.g. BCE summed over pixels, the seed paper's auto-encoder
    loss). Over the batch the terms are averaged (``batch_mean``, the optimizer's
    ``batch_averaged``) or summed. It must match the loss that ``.backward()`` is
    called on: then the true Fisher's ``g`` is on the same scale as the empirical
    Fisher's. A per-example loss that averages ``k`` terms is ``NLL / k``, and its
    Fisher carries ``1/k^2`` in both kinds; with ``"sum"`` the Fisher is the GGN of
    the loss itself.
    """
    check_loss(kind, reduction)
    check_output(output, kind)
    out = output.detach()
    if kind == "cross_entropy":
        logits = out.reshape(-1, out.shape[-1])
        y = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        terms = F.cross_entropy(output.reshape(-1, output.shape[-1]), y, reduction="none")
    elif kind == "bce":
        y = torch.bernoulli(torch.sigmoid(out), generator=generator)
        terms = F.binary_cross_entropy_with_logits(output, y, reduction="none")
    elif kind == "mse":
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        terms = F.mse_loss(output, out + noise * 0.5**0.5, reduction="none")
    else:
        raise AssertionError(kind)
    per_example = terms.reshape(output.shape[0], -1)
    per_example = per_example.mean(1) if reduction == "mean" else per_example.sum(1)
    return per_example.mean() if batch_mean else per_example.sum()


def _in_backward() -> bool:
    """Whether this thread runs inside an autograd backward pass (torch's own
    checkpointing asks the same way)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class CurvatureCapture:
    """Hooks on the tracked modules; holds this step's captures until the step reads them.

    Activation checkpointing (``torch.utils.checkpoint``) runs a forward again inside
    the backward pass. A forward inside backward is captured only when it is the one
    that will receive the gradient: under the empirical Fisher, when no forward of the
    module recorded outside backward still waits for its gradient (reentrant
    checkpointing, whose first forward ran under ``no_grad`` and was not captured);
    never under the true Fisher, whose gradients come from :meth:`sample_fisher` before
    the backward (so reentrant checkpointing cannot give them). A non-reentrant
    recomputation, whose original forward was captured, is skipped rather than held
    until the step.
    """

    def __init__(self, blocks: Sequence[LayerBlock], *, fisher: str, batch_averaged: bool) -> None:
        self.blocks = list(blocks)
        self.fisher = fisher
        self.batch_averaged = batch_averaged
        self.active = False
        self.captured: dict[LayerBlock, Captured] = {b: Captured() for b in self.blocks}
        self._handles: list[RemovableHandle] = []
        for b in self.blocks:
            assert b.module is not None, "only layers with an adapter are captured"
            self._handles.append(b.module.register_forward_hook(self._forward_hook(b)))

    def _forward_hook(self, block: LayerBlock):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active or not torch.is_grad_enabled() or not output.requires_grad:
                return
            store = self.captured[block]
            recomputed = _in_backward()
            if recomputed and (self.fisher != "empirical" or store.awaits_forward_gradient()):
                return  # activation checkpointing's recomputation of a captured forward
            with phase("kfe/capture"):
                slot = len(store.inputs)
                assert block.adapter is not None
                store.inputs.append(block.adapter.inputs(module, args[0].detach()))
                store.grads.append(None)
                store.recomputed.append(recomputed)
                if self.fisher == "empirical":
                    # bound to this store: a gradient arriving after ``clear()`` (zero_grad
                    # between forward and backward) lands in the discarded store
                    output.register_hook(lambda g: self._store_grad(block, store, slot, g))
                else:
                    store.outputs.append(output)

        return hook

    def _store_grad(self, block: LayerBlock, store: Captured, slot: int, grad: Tensor) -> None:
        with phase("kfe/capture"):
            assert block.adapter is not None and block.module is not None
            store.grads[slot] = block.adapter.output_grads(block.module, grad.detach())

    def sample_fisher(
        self,
        output: Tensor,
        kind: LossKind,
        generator: torch.Generator | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        """Capture ``g`` for the true Fisher: one backward of a sampled-label loss
        (:func:`sample_loss`, averaged over the batch as ``batch_averaged`` says).

        Call after the forward pass and *before* ``loss.backward()`` on steps where
        the optimizer's ``wants_statistics`` is true. Parameter ``.grad`` is untouched.
        """
        check_loss(kind, reduction)
        check_output(output, kind)
        if not self.active:
            return
        if self.fisher != "true":
            raise RuntimeError("sample_fisher needs the optimizer built with fisher='true'")
        if not output.requires_grad:
            raise ValueError(
                "output: does not require grad (detached, or computed under torch.no_grad); "
                "pass the model's output of this step's forward pass"
            )
        blocks = [b for b in self.blocks if self.captured[b].outputs]
        if not blocks:
            if any(g is not None for b in self.blocks for g in self.captured[b].grads):
                raise RuntimeError(
                    "sample_fisher was already called for this step's forward pass: call it "
                    "once per forward, before loss.backward()"
                )
            raise RuntimeError("sample_fisher found no captured forward pass in this step")
        outs = [o for b in blocks for o in self.captured[b].outputs]
        grads = torch.autograd.grad(
            sample_loss(output, kind, generator, reduction, self.batch_averaged),
            outs,
            retain_graph=True,
            allow_unused=True,
        )
        if all(g is None for g in grads):
            raise ValueError(
                "output: does not depend on any tracked layer's output captured in this "
                "step (pass the output of the model the optimizer was built on)"
            )
        it = iter(grads)
        for b in blocks:
            for slot, out in enumerate(self.captured[b].outputs):
                g = next(it)
                grad = torch.zeros_like(out) if g is None else g
                self._store_grad(b, self.captured[b], slot, grad)
            self.captured[b].outputs.clear()

    def example_scale(self, g: Tensor) -> float:
        """``s`` with per-example gradients ``s * g`` of a stored ``g`` (see the module doc)."""
        return float(g.shape[0]) if self.batch_averaged else 1.0

    def pop(self, block: LayerBlock) -> list[tuple[Tensor, Tensor]]:
        """This step's ``(x, g)`` pairs for ``block`` (``g`` as stored: times
        :meth:`example_scale` for per-example gradients), and forget them."""
        pairs = self.captured[block].pairs()
        self.captured[block] = Captured()
        return pairs

    def clear(self) -> None:
        for b in self.blocks:
            self.captured[b] = Captured()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
