"""Shared fixtures. Tests build their registry from an explicit plugin list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kfe import Registry, load_registry
from kfe_plugins import (
    adam,
    conv2d,
    ekfac,
    identity,
    kfac,
    kfac_basis,
    linear,
    rmsprop,
    sgd,
    shampoo,
    signsgd,
)

BUILTIN_PLUGINS = (
    *(linear, conv2d),
    *(kfac_basis, shampoo, identity),
    *(sgd, kfac, ekfac, rmsprop, signsgd, adam),
)


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(BUILTIN_PLUGINS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two shared cores: one intra-op thread keeps tiny matmuls from stalling. Use as
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
