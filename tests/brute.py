"""Brute-force twins of the quantities ``kfe`` computes, for layers small enough to be dense.

Nothing here imports ``kfe``: every quantity is derived from first principles with
``torch.func``, so a test comparing it with the optimizer can fail.

Conventions (the library's, see ``kfe/inspection.py``):

- a tracked layer is ``W_aug = [W | b]`` of shape ``(d_out, d_in + 1)`` (no bias column
  without a bias); a conv weight is viewed as ``weight.reshape(C_out, -1)``;
- ``vec`` is the row-major flatten of ``W_aug``, so K-FAC is ``kron(B, A)``;
- ``l_i`` is example ``i``'s own loss, the batch loss is ``mean_i l_i``.

The layer inputs ``x_{i,t}`` are recovered without ``F.unfold`` or any padding logic: the
layer output is linear in its weight, so ``x_{i,t} = d h_{i,t,0} / d W_aug[0, :]`` (the
Jacobian of output channel 0 at position ``t`` with respect to row 0 of ``W_aug``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error over every element (``F.mse_loss``'s default)."""
    return torch.nn.functional.mse_loss(out, y)


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy averaged over every position: logits ``(..., C)``, labels ``(...)``."""
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def detached_params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def per_example_grads(model: nn.Module, loss_fn: LossFn, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    """``d l_i / d theta`` for every example ``i`` (``vmap(grad(...))``), keyed by name."""

    def loss_i(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, params, (x[None],)), y[None])

    return vmap(grad(loss_i), in_dims=(None, 0, 0))(detached_params(model), X, Y)


def augmented(weight: Tensor, bias: Tensor | None) -> Tensor:
    """Stack per-example (leading dim) weight and bias tensors into ``(..., d_out, d_in[+1])``."""
    n, d_out = weight.shape[0], weight.shape[1]
    w = weight.reshape(n, d_out, -1)
    return w if bias is None else torch.cat([w, bias.reshape(n, d_out, 1)], dim=-1)


def layer_matrix(layer: nn.Module) -> Tensor:
    """The current ``W_aug`` of a layer (a detached copy)."""
    weight, bias = layer.weight.detach(), getattr(layer, "bias", None)
    matrix = weight.reshape(weight.shape[0], -1)
    return (matrix if bias is None else torch.cat([matrix, bias.detach()[:, None]], 1)).clone()


def per_example_layer_grads(
    model: nn.Module, prefix: str, loss_fn: LossFn, X: Tensor, Y: Tensor
) -> Tensor:
    """``G_i`` of layer ``prefix`` as ``(n, d_out, d_in[+1])`` from ``torch.func``."""
    grads = per_example_grads(model, loss_fn, X, Y)
    return augmented(grads[f"{prefix}.weight"], grads.get(f"{prefix}.bias"))


def dense_fisher(G: Tensor) -> Tensor:
    """Empirical Fisher ``(1/n) sum_i vec(G_i) vec(G_i)^T`` (row-major ``vec``)."""
    v = G.reshape(G.shape[0], -1)
    return v.mT @ v / G.shape[0]


def layer_io(
    model: nn.Sequential, index: int, loss_fn: LossFn, X: Tensor, Y: Tensor, channel_dim: int
) -> tuple[Tensor, Tensor]:
    """``x`` (``(n, T, d_in[+1])``, bias coordinate last) and ``g`` (``(n, T, d_out)``).

    ``channel_dim`` is the dim of the layer output holding the output features (``-1`` for
    ``nn.Linear``, ``1`` for ``nn.Conv2d``); the other non-batch dims are the positions.
    ``g_{i,t} = d l_i / d h_{i,t}`` with ``l_i`` the loss of example ``i`` alone.
    """
    layer, head, tail = model[index], model[:index], model[index + 1 :]
    with torch.no_grad():
        inp = head(X)
        H = layer(inp)
    params = detached_params(layer)
    has_bias = "bias" in params
    cd = channel_dim % H.ndim - 1  # the channel dim of one example's output

    xs = []
    for i in range(X.shape[0]):
        jac = jacrev(lambda p, i=i: functional_call(layer, p, (inp[i : i + 1],)))(params)
        jw = jac["weight"][0].select(cd, 0)  # positions..., *weight.shape
        d_out = params["weight"].shape[0]
        x = jw.reshape(-1, d_out, params["weight"][0].numel())[:, 0]
        if has_bias:
            jb = jac["bias"][0].select(cd, 0).reshape(-1, d_out)[:, :1]
            x = torch.cat([x, jb], dim=1)
        xs.append(x)

    def loss_of_output(h: Tensor, y: Tensor) -> Tensor:
        return loss_fn(tail(h[None]), y[None])

    g = vmap(grad(loss_of_output))(H, Y)
    g = g.movedim(cd + 1, -1).reshape(X.shape[0], -1, H.shape[channel_dim])
    return torch.stack(xs), g


def factors(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``A = (1/(nT)) sum x x^T``, ``B = (1/n) sum g g^T`` by explicit sums."""
    n, T = x.shape[0], x.shape[1]
    A = torch.zeros(x.shape[-1], x.shape[-1], dtype=x.dtype)
    B = torch.zeros(g.shape[-1], g.shape[-1], dtype=g.dtype)
    for i in range(n):
        for t in range(T):
            A += torch.outer(x[i, t], x[i, t])
            B += torch.outer(g[i, t], g[i, t])
    return A / (n * T), B / n
