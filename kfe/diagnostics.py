"""Curvature diagnostics: the optimizer's Fisher approximations against the exact block.

The diagnostic of George et al. (2018, fig. 2): for a layer small enough to hold its
dense Fisher block, how far is each approximation from it, and how does that evolve
between basis refreshes? For a layer with ``W_aug = [W | b]`` of shape
``(d_out, d_in+1)`` (bias column last) and per-example gradients
``G_i = sum_t g_{i,t} x_{i,t}^T`` on a held-out batch of ``n`` examples,

.. math::

    G = \\frac1n \\sum_i \\mathrm{vec}(G_i)\\, \\mathrm{vec}(G_i)^\\top, \\qquad
    \\mathrm{err}(\\hat G) = \\frac{\\lVert G - \\hat G \\rVert_F}{\\lVert G \\rVert_F},

with the row-major ``vec`` of ``W_aug`` (``W_aug.reshape(-1)``), the order of
:func:`kfe.inspect_layer`'s dense matrices, in which the optimizer's basis is
``U = U_B (x) U_A``. Every approximation is ``G_hat = U diag(vec Lambda) U^T`` with the
optimizer's *current* (amortized) basis, the one of its last refresh:

- ``kfac``: ``Lambda = b a^T``, the factor eigenvalues stored at the last refresh (they go
  stale between refreshes, as the optimizer uses them); only for a basis with Fisher
  eigenvalues (``kfac`` source);
- ``ekfac``: ``Lambda = diag(U^T G U)``, the *optimal* diagonal in that basis for the
  held-out batch (``E_i[(U_B^T G_i U_A)^2]``), so that ``err_ekfac <= err_kfac`` at every
  sample is a theorem (any diagonal in the same basis does no better), and the growth of
  ``err_ekfac`` between refreshes measures the staleness of the basis alone;
- the optimizer's rule, if it defines a curvature diagonal (:meth:`kfe.Rule.diagonal`):
  under the rule's name, or ``<name>_state`` where that would clash (``ekfac_state``: the
  running ``Lambda`` the optimizer divides by; ``kfac_state``). Rules whose diagonal is
  a moment of the minibatch-*mean* gradient (``rmsprop``, ``adam``) are about ``1/n_batch``
  of the Fisher scale, so their raw error is close to 1; ``scaled_errors`` gives every
  method's error after the best scalar fit ``c* = <diag C, Lambda> / ||Lambda||^2``.

Since ``U`` is orthogonal the errors are computed in KFE coordinates, without forming
``U`` or ``G``: with ``P_i = U_B^T G_i U_A`` and ``C = U^T G U = (1/n) sum_i vec P_i vec P_i^T``,

.. math::

    \\lVert G - \\hat G \\rVert_F^2 = \\lVert C \\rVert_F^2 - \\lVert \\mathrm{diag}\\, C \\rVert^2
    + \\lVert \\mathrm{diag}\\, C - \\mathrm{vec}\\,\\Lambda \\rVert^2, \\qquad
    \\lVert C \\rVert_F = \\tfrac1n \\lVert V V^\\top \\rVert_F \\ (V = [\\mathrm{vec} P_i]_i),

in float64. Fisher kinds follow the optimizer's ``config.fisher``: *empirical* uses the
held-out labels and ``loss_fn``; *true* draws labels from the model exactly as
``opt.sample_fisher`` does (:func:`kfe.capture.sample_loss`: categorical for
``cross_entropy``, Bernoulli for ``bce``, Gaussian with variance 1/2 for ``mse``; each
example's terms averaged or summed as ``reduction`` says, the batch averaged as
``config.batch_averaged`` says), ``mc_samples`` draws per example. Gradients of a
batch-mean loss are rescaled by ``n`` when ``config.batch_averaged`` (as the capture
does), so ``G`` is on the optimizer's scale. The model runs in ``eval`` mode
(per-example gradients need examples that do not interact) and the optimizer's own
capture hooks are paused.

Usage from a training loop::

    diag = CurvatureDiagnostics(opt, model, loss_fn, (x_val, y_val), ["fc1", "fc2"],
                                every=5, out_path=Path("curvature.jsonl"),
                                loss_kind="cross_entropy")
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        diag.maybe_record(step)
    plot(Path("curvature.jsonl"), Path("curvature.png"))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from kfe import state_keys as K
from kfe.capture import LossKind, Reduction, check_loss, sample_loss
from kfe.inspection import inspect_layer

if TYPE_CHECKING:
    from kfe.block import LayerBlock
    from kfe.optimizer import KFEOptimizer

__all__ = [
    "DIAGNOSTIC_MAX_DIM",
    "CurvatureDiagnostics",
    "approximation_errors",
    "exact_fisher",
    "fisher_block",
    "layer_gradients",
    "plot",
    "read_rows",
]

DIAGNOSTIC_MAX_DIM = 4096
"""Default cap on a layer's block size ``d_out * (d_in + 1)`` (its dense ``G`` has the
square of that many entries: 4096 -> 128 MiB in float64)."""

FisherKind = Literal["empirical", "true"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _block_dims(block: LayerBlock) -> tuple[int, int]:
    """``(d_out, d_in[+1])`` of a block's ``W_aug``."""
    d_out = block.weight.shape[0]
    return d_out, block.weight.numel() // d_out + (block.bias is not None)


def resolve_layers(
    optimizer: KFEOptimizer, layers: Sequence[str], max_dim: int = DIAGNOSTIC_MAX_DIM
) -> list[LayerBlock]:
    """The tracked blocks named ``layers``; clear errors for unknown or too large ones."""
    if isinstance(layers, str):
        raise TypeError(f"layers: must be a list of module names, not the str {layers!r}")
    tracked = [b for b in optimizer.blocks if b.tracked]
    names = ", ".join(repr(b.name) for b in tracked)
    blocks = []
    for name in layers:
        block = next((b for b in tracked if b.name == name), None)
        if block is None:
            raise ValueError(f"unknown layer {name!r}: the optimizer tracks {names}")
        d_out, cols = _block_dims(block)
        if d_out * cols > max_dim:
            raise ValueError(
                f"layer {name!r} is too large for the dense diagnostic: its block has "
                f"{d_out * cols} parameters (d_out={d_out} x (d_in+1)={cols}), above the "
                f"cap max_dim={max_dim}; pick a smaller layer or raise max_dim"
            )
        blocks.append(block)
    return blocks


def check_sampling(fisher: str, loss_kind: str | None, reduction: str, mc_samples: object) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the argument for a bad Fisher kind,
    ``loss_kind``, ``reduction`` or ``mc_samples``."""
    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true', not {fisher!r}")
    if fisher == "true" and loss_kind is None:
        raise ValueError("the true Fisher needs loss_kind ('cross_entropy', 'bce' or 'mse')")
    if loss_kind is not None:
        try:
            check_loss(loss_kind, reduction)
        except ValueError as e:
            raise ValueError(str(e).replace("kind:", "loss_kind:", 1)) from None
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool):
        raise TypeError(f"mc_samples: must be a positive int, not {mc_samples!r}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples: must be at least 1, not {mc_samples}")


def layer_gradients(
    optimizer: KFEOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    layers: Sequence[str],
    *,
    fisher: FisherKind | None = None,
    loss_kind: LossKind | None = None,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    mc_samples: int = 1,
    max_dim: int = DIAGNOSTIC_MAX_DIM,
) -> dict[str, Tensor]:
    """Per-example gradients ``G_i`` of each layer, ``(n * mc_samples, d_out, d_in[+1])``.

    One forward pass with hooks on the chosen layers (through their layer adapters, so
    any layer type a plugin supports) and one backward per label draw to the layer
    outputs only: parameter ``.grad`` and the optimizer's captures are untouched.
    ``G_i = sum_t g_{i,t} x_{i,t}^T`` with the constant-1 bias coordinate last and
    ``g_{i,t} = d l_i / d h_{i,t}`` (the batch-mean gradient times ``n`` when the
    optimizer's ``batch_averaged`` is set).

    Args:
        fisher: ``"empirical"`` (``loss_fn`` on the batch's labels) or ``"true"`` (labels
            sampled from the model); default: the optimizer's ``config.fisher``.
        loss_kind: the predictive distribution for ``"true"``.
        reduction: how ``loss_fn`` combines an example's output terms, ``"mean"`` or
            ``"sum"`` (:func:`kfe.capture.sample_loss`), for ``"true"``.
        generator: random source of the sampled labels.
        mc_samples: label draws per example (``"true"`` only).
    """
    fisher = fisher or optimizer.config.fisher
    check_sampling(fisher, loss_kind, reduction, mc_samples)
    blocks = resolve_layers(optimizer, layers, max_dim)
    inputs: dict[str, list[Tensor]] = {b.name: [] for b in blocks}
    outputs: dict[str, list[Tensor]] = {b.name: [] for b in blocks}

    def hook_for(block: LayerBlock) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            assert block.adapter is not None
            inputs[block.name].append(block.adapter.inputs(module, args[0].detach()))
            outputs[block.name].append(output)

        return hook

    handles = [b.module.register_forward_hook(hook_for(b)) for b in blocks if b.module is not None]
    modes = {m: m.training for m in model.modules()}
    capturing = optimizer.capture.active
    optimizer.capture.active = False
    try:
        model.eval()
        X, Y = batch
        with torch.enable_grad():
            out = model(X)
            targets = [o for b in blocks for o in outputs[b.name]]
            if not all(o.requires_grad for o in targets):
                raise ValueError("the chosen layers' outputs do not require grad")
            draws = 1 if fisher == "empirical" else mc_samples
            grads_per_draw = []
            for k in range(draws):
                if fisher == "empirical":
                    loss = loss_fn(out, Y)
                else:
                    assert loss_kind is not None
                    loss = sample_loss(
                        out, loss_kind, generator, reduction, optimizer.config.batch_averaged
                    )
                grads_per_draw.append(
                    torch.autograd.grad(
                        loss, targets, retain_graph=k < draws - 1, allow_unused=True
                    )
                )
    finally:
        optimizer.capture.active = capturing
        for m, training in modes.items():
            m.train(training)
        for h in handles:
            h.remove()

    result = {}
    offset = 0
    for block in blocks:
        assert block.adapter is not None and block.module is not None
        count = len(outputs[block.name])
        if count == 0:
            raise ValueError(f"layer {block.name!r} was not called in the forward pass")
        x = torch.cat(inputs[block.name], dim=1)  # several calls: more positions
        if block.bias is not None:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        per_draw = []
        for grads in grads_per_draw:
            gs = []
            for out_k, grad in zip(
                outputs[block.name], grads[offset : offset + count], strict=True
            ):
                grad = torch.zeros_like(out_k) if grad is None else grad
                g = block.adapter.output_grads(block.module, grad.detach())
                gs.append(g * g.shape[0] if optimizer.config.batch_averaged else g)
            g = torch.cat(gs, dim=1)
            per_draw.append(torch.einsum("nto,nti->noi", g, x))
        offset += count
        result[block.name] = torch.cat(per_draw, dim=0)
    return result


def fisher_block(per_example: Tensor) -> Tensor:
    """``G = (1/n) sum_i vec(G_i) vec(G_i)^T`` (row-major ``vec``) from ``(n, d_out, d_in)``."""
    v = per_example.reshape(per_example.shape[0], -1)
    return v.mT @ v / per_example.shape[0]


def exact_fisher(
    optimizer: KFEOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    layer: str,
    **kwargs: Any,
) -> Tensor:
    """The dense Fisher block ``G`` of one layer on ``batch`` (keywords as
    :func:`layer_gradients`), acting on ``W_aug.reshape(-1)``."""
    return fisher_block(layer_gradients(optimizer, model, loss_fn, batch, [layer], **kwargs)[layer])


def approximation_errors(
    optimizer: KFEOptimizer, layer: str, per_example: Tensor
) -> tuple[dict[str, float], dict[str, float]]:
    """``(errors, scaled_errors)`` of every approximation (module docstring) for ``layer``.

    ``per_example`` is ``(n, d_out, d_in[+1])`` from :func:`layer_gradients`; the basis,
    the eigenvalues and the rule's diagonal are the optimizer's current ones.
    """
    block = optimizer.block(layer)
    current = inspect_layer(optimizer, block.name)
    basis = current.basis
    expected = (basis.U_B.shape[0], basis.U_A.shape[0])
    if tuple(per_example.shape[1:]) != expected:
        raise ValueError(
            f"layer {layer!r}: gradients of shape {tuple(per_example.shape[1:])} do not "
            f"match the block {expected}"
        )
    f64 = torch.float64
    U_B, U_A = basis.U_B.to(f64), basis.U_A.to(f64)
    n = per_example.shape[0]
    V = (U_B.mT @ per_example.to(f64) @ U_A).reshape(n, -1)
    diag_c = V.square().mean(0)
    gram = V @ V.mT if n <= V.shape[1] else V.mT @ V
    norm2 = float(torch.linalg.matrix_norm(gram).square()) / n**2
    off2 = max(norm2 - float(diag_c.square().sum()), 0.0)
    norm = norm2**0.5

    def error(lam: Tensor) -> tuple[float, float]:
        if norm == 0:
            return float("nan"), float("nan")
        lam = lam.reshape(-1).to(f64)
        raw = (off2 + float((diag_c - lam).square().sum())) ** 0.5 / norm
        denom = float(lam.square().sum())
        c = max(float(diag_c @ lam) / denom, 0.0) if denom > 0 else 0.0
        scaled = (off2 + float((diag_c - c * lam).square().sum())) ** 0.5 / norm
        return raw, scaled

    approximations: dict[str, Tensor] = {}
    ctx = optimizer.rule_context(block)
    if ctx.eigenvalues is not None:
        approximations["kfac"] = ctx.eigenvalue_product()
    approximations["ekfac"] = diag_c
    if current.diagonal is not None:
        name = optimizer.rule.name
        approximations[f"{name}_state" if name in approximations else name] = current.diagonal
    errors, scaled = {}, {}
    for key, lam in approximations.items():
        errors[key], scaled[key] = error(lam)
    return errors, scaled


class CurvatureDiagnostics:
    """Sample the approximation errors of some layers every ``every`` steps, as JSONL.

    Call :meth:`maybe_record` after each optimizer step. Each sample appends one row per
    layer to ``out_path``::

        {"step": 45, "layer": "0", "refreshed_at": 0, "refreshes": 1,
         "fisher": "empirical", "n": 256,
         "errors": {"kfac": 0.41, "ekfac": 0.22, "ekfac_state": 0.30},
         "scaled_errors": {...}}

    ``step`` is the 0-based index of the step just taken (default
    ``optimizer.steps_taken - 1``, the optimizer's own cadence convention: step ``t``
    refreshes when ``t % basis_every == 0``); ``refreshed_at`` is the step of the last
    successful basis refresh of that layer, seen as ``optimizer.state[weight]["refreshes"]``
    changing between two consecutive calls (or, if calls were skipped, taken from
    ``basis_every``). See the module docstring for the errors.

    Args:
        optimizer: the :class:`kfe.KFEOptimizer` training ``model``.
        model: the model (run on ``held_out`` in eval mode).
        loss_fn: ``loss_fn(model(x), y)``, the batch-mean training loss (empirical Fisher).
        held_out: ``(x, y)``, a batch not trained on.
        layers: module names of tracked layers (as in ``model.named_modules()``).
        every: sample when ``step % every == 0``.
        out_path: the JSONL file (appended to; parent folders created).
        loss_kind: the predictive distribution, needed for ``fisher="true"``.
        reduction: how ``loss_fn`` combines an example's output terms (true Fisher).
        fisher: default: the optimizer's ``config.fisher``.
        seed: seed of the label-sampling generator (true Fisher).
        mc_samples: label draws per held-out example (true Fisher).
        max_dim: the cap on ``d_out * (d_in + 1)`` per layer.

    Raises:
        ValueError: an unknown layer (the message lists the tracked ones), or one whose
            block exceeds ``max_dim`` (named, with its size and the cap).
    """

    def __init__(
        self,
        optimizer: KFEOptimizer,
        model: nn.Module,
        loss_fn: LossFn,
        held_out: tuple[Tensor, Tensor],
        layers: Sequence[str],
        every: int,
        out_path: Path,
        loss_kind: LossKind | None = None,
        *,
        reduction: Reduction = "mean",
        fisher: FisherKind | None = None,
        seed: int = 0,
        mc_samples: int = 1,
        max_dim: int = DIAGNOSTIC_MAX_DIM,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, not {every}")
        self.optimizer = optimizer
        self.model = model
        self.loss_fn = loss_fn
        self.held_out = held_out
        self.blocks = resolve_layers(optimizer, layers, max_dim)
        self.layers = [b.name for b in self.blocks]
        self.every = every
        self.out_path = Path(out_path)
        self.fisher: FisherKind = fisher or optimizer.config.fisher
        if self.fisher == "true" and loss_kind is None:
            raise ValueError("fisher='true' needs loss_kind ('cross_entropy', 'bce' or 'mse')")
        check_sampling(self.fisher, loss_kind, reduction, mc_samples)
        self.loss_kind = loss_kind
        self.reduction: Reduction = reduction
        self.mc_samples = mc_samples
        self.max_dim = max_dim
        device = held_out[0].device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seen: dict[str, int] = {name: self._refreshes(name) for name in self.layers}
        self._refreshed_at: dict[str, int | None] = {name: None for name in self.layers}
        self._last_call: int | None = None

    def _refreshes(self, layer: str) -> int:
        st = self.optimizer.state[self.optimizer.block(layer).weight]
        return int(st.get(K.REFRESHES, 0))

    def _track_refreshes(self, step: int) -> None:
        consecutive = self._last_call is not None and self._last_call == step - 1
        basis_every = self.optimizer.config.basis_every
        for name in self.layers:
            count = self._refreshes(name)
            if count != self._seen[name]:
                first = self._last_call is None and self._seen[name] == 0 and step == 0
                exact = consecutive or first
                self._refreshed_at[name] = step if exact else step - step % basis_every
                self._seen[name] = count
            elif self._refreshed_at[name] is None and count:
                self._refreshed_at[name] = step - step % basis_every
        self._last_call = step

    def maybe_record(self, step: int | None = None) -> list[dict[str, Any]]:
        """Track refreshes; on sampling steps, compute and append the rows (returned)."""
        step = self.optimizer.steps_taken - 1 if step is None else int(step)
        self._track_refreshes(step)
        if step % self.every != 0:
            return []
        return self.record(step)

    def record(self, step: int) -> list[dict[str, Any]]:
        """Compute this step's errors for every layer and append them to ``out_path``."""
        grads = layer_gradients(
            self.optimizer,
            self.model,
            self.loss_fn,
            self.held_out,
            self.layers,
            fisher=self.fisher,
            loss_kind=self.loss_kind,
            reduction=self.reduction,
            generator=self.generator,
            mc_samples=self.mc_samples,
            max_dim=self.max_dim,
        )
        rows = []
        for name in self.layers:
            errors, scaled = approximation_errors(self.optimizer, name, grads[name])
            rows.append(
                {
                    "step": step,
                    "layer": name,
                    "refreshed_at": self._refreshed_at[name],
                    "refreshes": self._seen[name],
                    "fisher": self.fisher,
                    "n": int(grads[name].shape[0]),
                    "errors": errors,
                    "scaled_errors": scaled,
                }
            )
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with self.out_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return rows


def read_rows(jsonl_path: Path) -> list[dict[str, Any]]:
    """The rows of a diagnostics JSONL file."""
    lines = Path(jsonl_path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot(jsonl_path: Path, png_path: Path, *, scaled: bool = False) -> None:
    """The paper's plot: relative error against iteration, one panel per layer.

    One line per method (``errors``, or ``scaled_errors`` with ``scaled=True``), the
    basis refreshes as dotted vertical lines. Uses matplotlib's Agg canvas directly
    (no pyplot, no global backend change), so it runs headless.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_rows(jsonl_path)
    if not rows:
        raise ValueError(f"{jsonl_path}: no diagnostic rows to plot")
    key = "scaled_errors" if scaled else "errors"
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig = Figure(figsize=(7, 2.8 * len(layers)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, layer in zip(axes, layers, strict=True):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["step"])
        methods = list(dict.fromkeys(m for r in mine for m in r[key]))
        for method in methods:
            points = [(r["step"], r[key][method]) for r in mine if method in r[key]]
            ax.plot(*zip(*points, strict=True), marker=".", label=method)
        refreshes = sorted({r["refreshed_at"] for r in mine if r["refreshed_at"] is not None})
        for k, at in enumerate(refreshes):
            ax.axvline(at, color="gray", linestyle=":", label="refresh" if k == 0 else None)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("||G - Ĝ||_F / ||G||_F" + (" (scaled)" if scaled else ""))
        ax.legend(fontsize="small")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
