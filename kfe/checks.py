"""Checks the optimizer runs on its arguments and on the numbers it is handed.

Finiteness is read from sums (NaN and inf propagate through them) with one host sync for
any number of tensors; argument checks refuse what ``torch.optim`` would accept silently
or report obscurely, with a message that names the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["all_finite", "checked_params", "checked_scale", "finite_each"]


def finite_each(tensors: Sequence[Tensor | None]) -> list[bool]:
    """Per tensor, whether every entry is finite (``None`` counts as finite), with one
    host sync: NaN and inf propagate through sums, the cheapest reduction (a finite
    tensor whose sum overflows counts as not)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [True] * len(tensors)
    sums = [t.sum() if t.element_size() >= 4 else t.sum(dtype=torch.float32) for t in present]
    flags = iter(torch.stack([s.double() for s in sums]).isfinite().tolist())
    return [True if t is None else next(flags) for t in tensors]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one host sync)."""
    return all(finite_each(tensors))


def checked_scale(loss_scale: object) -> float:
    """``loss_scale`` as a float: a real number or a one-element tensor, positive, finite."""
    one_element = isinstance(loss_scale, Tensor) and loss_scale.numel() == 1
    real = isinstance(loss_scale, numbers.Real) and not isinstance(loss_scale, bool)
    if one_element or real:
        value = float(cast(Any, loss_scale))
    else:
        raise TypeError(
            f"loss_scale: must be a positive finite number (a float or a one-element tensor), "
            f"not {loss_scale!r}"
        )
    if not 0 < value < math.inf:
        raise ValueError(f"loss_scale: must be a positive finite number, not {loss_scale!r}")
    return value


def checked_params(params: Iterable[Any]) -> list[Any]:
    """``params`` as a list (a generator is read once), refusing what torch would accept
    silently or report obscurely: a group without ``"params"``, a parameter listed twice
    (it would be updated twice per step)."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params: must be an iterable of parameters or of parameter groups (dicts), "
            f"not a single tensor of shape {tuple(params.shape)}"
        )
    items = list(params)
    groups = items if items and all(isinstance(g, Mapping) for g in items) else [{"params": items}]
    seen: set[Tensor] = set()
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            continue
        if "params" not in group:
            raise KeyError(f"params: parameter group {i} has no 'params' entry")
        members = group["params"]
        members = [members] if isinstance(members, Tensor) else list(members)
        for p in members:
            if not isinstance(p, Tensor):
                continue  # torch's own TypeError names it
            if p in seen:
                raise ValueError(
                    f"params: a parameter of shape {tuple(p.shape)} is listed more than once "
                    f"(group {i}); each parameter may appear once"
                )
            seen.add(p)
    return items
