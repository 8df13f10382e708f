"""Shared fixtures. Tests build their registry from an explicit plugin list."""

from __future__ import annotations

import pytest
import torch
from kfe_plugins import conv2d, ekfac, kfac, linear, sgd

from kfe import Registry, load_registry

BUILTIN_PLUGINS = (linear, conv2d, sgd, kfac, ekfac)


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(BUILTIN_PLUGINS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
