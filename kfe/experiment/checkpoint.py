"""Checkpoints and run files, written so that a crash never leaves half a file.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``-d over the target (atomic on POSIX). Checkpoints we read back may come
from elsewhere, so they are loaded with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, no pickled code. A checkpoint that is missing,
unreadable, refused by that safe load, or lacks the expected entries is a
:class:`CheckpointError` naming the file and what is wrong (``kfe`` exits with code 2).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from kfe.experiment.config import ConfigError

__all__ = [
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "write_json",
    "write_yaml",
]

CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary sibling, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def write_yaml(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(yaml.safe_dump(data, sort_keys=False).encode()))


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a mapping of plain data and tensors."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


Schema = Mapping[str, type | tuple[type, ...]]
"""The entries a checkpoint must have, each with the type(s) its value may be."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: missing, unreadable or not a kfe checkpoint."""


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", required: Schema | None = None
) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``): a mapping with the ``required``
    entries, or a :class:`CheckpointError` naming ``path`` and what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # whatever a damaged or foreign file makes torch.load raise
        raise CheckpointError(_load_failure(path, exc)) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a kfe checkpoint: it holds a {type(state).__name__}, not a mapping"
        )
    _check_entries(path, state, required or {})
    return state


def _load_failure(path: Path, exc: Exception) -> str:
    """What is wrong with a file ``torch.load`` failed on."""
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return (
            f"{path}: not a kfe checkpoint: it holds pickled objects other than tensors and "
            "plain data, which the safe load (weights_only=True) refuses; it was not loaded"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{path}: unreadable checkpoint (truncated, damaged or not a torch file): {reason}"


def _check_entries(path: Path, state: Mapping[str, Any], required: Schema) -> None:
    """Every ``required`` entry is there with a value of its type."""
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a kfe checkpoint: missing entries {', '.join(map(repr, missing))}"
        )
    wrong = [
        f"{key!r} is a {type(state[key]).__name__}"
        for key, kind in required.items()
        if not isinstance(state[key], kind)
    ]
    if wrong:
        raise CheckpointError(f"{path}: not a kfe checkpoint: {'; '.join(wrong)}")
