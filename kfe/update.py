"""What happens to a direction after the rule: KL clipping, momentum, weight decay, ``p -= lr d``.

These follow ``torch.optim.SGD`` and ``torch.optim.AdamW`` op for op, so that the
identity-basis limits reproduce them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kfe import state_keys as K
from kfe.profiling import phase

__all__ = ["Update", "apply_update", "clip_kl"]


class Update(NamedTuple):
    """A direction ready for :func:`apply_update` (and the gradient it came from)."""

    st: dict[str, Any]
    """The state that holds the momentum buffer (a block's weight's, or a parameter's)."""
    group: Mapping[str, Any]
    direction: Tensor
    params: list[nn.Parameter] | list[Tensor]
    split: Callable[[Tensor], list[Tensor]]
    """Maps the direction onto ``params`` (a block's weight and bias)."""
    grad: Tensor
    """The gradient the rule saw (with ``l2`` decay, its L2 term included): KL clipping's
    ``<D, grad>``."""


def clip_kl(updates: list[Update], kl_clip: float) -> None:
    """K-FAC's KL clipping (Ba et al., 2017), in place: scale every direction by

    .. math::

        \\nu = \\min\\Big(1, \\sqrt{\\kappa \\big/ \\textstyle\\sum_p \\eta_p^2
        \\langle D_p, \\nabla_p \\rangle}\\Big),

    a trust region on the predicted change of the model's output distribution
    (``D`` the rule's direction before momentum). One tensor, no host sync.
    """
    if not updates:
        return
    with phase("kfe/rule"):
        terms = [(u.direction * u.grad).sum() * u.group["lr"] ** 2 for u in updates]
        total = torch.stack([t.to(updates[0].direction.device) for t in terms]).sum()
        nu = (kl_clip / total.clamp(min=torch.finfo(total.dtype).tiny)).sqrt().clamp(max=1)
        for i, u in enumerate(updates):
            updates[i] = u._replace(direction=u.direction * nu.to(u.direction.dtype))


def apply_update(update: Update, *, decoupled_decay: bool) -> None:
    """Momentum and weight decay around the rule, then ``p -= lr * d``.

    Follows ``torch.optim.SGD`` op for op (momentum buffer cloned on the first step,
    ``buf = mu * buf + (1 - dampening) * d``, Nesterov ``d + mu * buf``), and
    ``torch.optim.AdamW`` for decoupled decay (``p *= 1 - lr * wd`` first; with
    ``decoupled_decay`` false the decay was added to the gradient as an L2 term).
    """
    st, group, direction = update.st, update.group, update.direction
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    if mu:
        buf = st.get(K.MOMENTUM)
        if buf is None:
            buf = st[K.MOMENTUM] = torch.clone(direction).detach()
        else:
            buf.mul_(mu).add_(direction, alpha=1 - group["dampening"])
        direction = direction.add(buf, alpha=mu) if group["nesterov"] else buf
    for p, d in zip(update.params, update.split(direction), strict=True):
        if wd and decoupled_decay:
            p.mul_(1 - lr * wd)
        p.add_(d, alpha=-lr)
