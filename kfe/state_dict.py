"""The optimizer's ``state_dict``: what it records beside torch's, and what a load checks.

``state_dict()["kfe"]`` holds the step counter and the names of the rule, basis and
fallback rule whose state the dict carries. A load maps the saved parameter ids onto
this optimizer's parameters, copies every tensor exactly (no dtype cast: factors stay
in the precision they were kept in), and refuses, before anything is replaced, the state
of another rule, basis or fallback or of a layer of another width.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kfe import state_keys as K
from kfe.block import LayerBlock
from kfe.config import KFEConfigBase

__all__ = ["check_loadable", "restore_state", "state_kinds"]


def state_kinds(config: KFEConfigBase) -> dict[str, str]:
    """The names of the rule, basis and fallback rule a config runs."""
    return {
        "rule": config.rule_config.name,
        "basis": config.basis_config.name,
        "fallback": config.fallback_config.name,
    }


def restore_state(
    state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]
) -> tuple[defaultdict[Tensor, dict[str, Any]], list[dict[str, Any]]]:
    """``(state, param_groups)`` of a saved dict, keyed by this optimizer's parameters:
    tensors detached, cloned and moved to their parameter's device, dtypes kept; the
    groups take the saved hyperparameters and this optimizer's ``params``."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
        len(s["params"]) != len(g["params"])
        for s, g in zip(saved_groups, param_groups, strict=True)
    ):
        raise ValueError("loaded state dict does not match this optimizer's parameter groups")
    id_map = dict(
        zip(
            itertools.chain.from_iterable(s["params"] for s in saved_groups),
            itertools.chain.from_iterable(g["params"] for g in param_groups),
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
        for saved, group in zip(saved_groups, param_groups, strict=True)
    ]
    return state, groups


def check_loadable(
    blocks: Sequence[LayerBlock],
    state: Mapping[Tensor, Any],
    *,
    ours: Mapping[str, str],
    saved: Mapping[str, Any],
) -> None:
    """Refuse a state dict of another rule, basis or fallback (``saved``: its ``"kfe"``
    entry, against ``ours``, :func:`state_kinds` of this optimizer; its rule state would
    fail mid-step), or one whose factors or basis in ``state`` (restored, keyed by
    parameter) do not fit a layer (another width): a ``ValueError`` naming what differs.
    A state dict without the names (written before they were recorded) is checked by
    shape only."""
    theirs = {k: saved[k] for k in ours if k in saved}
    if any(theirs[k] != ours[k] for k in theirs):

        def kinds(names: Mapping[str, str]) -> str:
            return ", ".join(f"{k} {v!r}" for k, v in names.items())

        raise ValueError(
            f"loaded state dict holds the state of {kinds(theirs)}; this optimizer runs "
            f"{kinds(ours)}: build it with the same rule, basis and fallback"
        )
    for block in blocks:
        st = state.get(block.weight, {})
        d_out, d_in = block.shape
        want = {
            K.FACTOR_A: (d_in, d_in),
            K.FACTOR_B: (d_out, d_out),
            "U_A": (d_in, d_in),
            "U_B": (d_out, d_out),
            K.MOMENTUM: (d_out, d_in),
        }
        held = {**st, **st.get(K.BASIS, {})}
        for key, shape in want.items():
            value = held.get(key)
            if isinstance(value, Tensor) and tuple(value.shape) != shape:
                raise ValueError(
                    f"loaded state dict does not fit layer {block.name!r}: its {key} is "
                    f"{tuple(value.shape)}, the layer's (d_out, d_in[+1]) = {block.shape} "
                    f"needs {shape}"
                )
