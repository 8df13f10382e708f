"""Where kfe looks for data on disk and where it caches parsed arrays."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "DATA_DIR_ENV", "default_cache_dir", "default_data_dir"]

#: Environment variable naming a folder of datasets (``<dir>/mnist``, ``<dir>/cifar-10-...``).
DATA_DIR_ENV = "KFE_DATA_DIR"
#: Environment variable naming the cache folder (default ``~/.cache/kfe``).
CACHE_DIR_ENV = "KFE_CACHE_DIR"


def default_data_dir() -> Path | None:
    """The data folder named by ``$KFE_DATA_DIR``, or None when it is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """The cache folder: ``$KFE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kfe``, else ``~/.cache/kfe``."""
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kfe"
