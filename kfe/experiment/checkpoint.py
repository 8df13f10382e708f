"""Checkpoints and run files, written so that a crash never leaves half a file.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``-d over the target (atomic on POSIX). Checkpoints we read back may come
from elsewhere, so they are loaded with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, no pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
import yaml

__all__ = ["atomic_write", "load_checkpoint", "save_checkpoint", "write_json", "write_yaml"]

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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return dict(torch.load(path, map_location=map_location, weights_only=True))
