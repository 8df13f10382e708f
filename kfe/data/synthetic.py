"""``synthetic32``: deterministic, learnable CIFAR-shaped (3x32x32, 10 classes) data.

Each class has a smooth colour template (a sum of a few random plane waves per channel,
drawn from ``seed``). An example is its class template at a random contrast, shifted by up
to 2 pixels, over a random mixture of the other templates and white noise, around grey 0.5
and clipped to ``[0, 1]``. Examples are generated in blocks of 256, each block from its
own seed ``(seed, split, block)``, so the first k examples never depend on how many are
asked for and train and test never share a draw.
"""

from __future__ import annotations

import numpy as np

from kfe.data.dataset import Arrays

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_TEST", "SYNTHETIC_TRAIN", "synthetic32_arrays"]

SYNTHETIC_TRAIN = 2048
SYNTHETIC_TEST = 512
SYNTHETIC_CLASSES = 10
_SIDE = 32
_BLOCK = 256
_WAVES = 4
_SIGNAL = 0.14
_CLUTTER = 0.04
_NOISE = 0.12
_MAX_SHIFT = 2


def _templates(seed: int) -> np.ndarray:
    """``(10, 3, 32, 32)`` float64 class templates with zero mean and unit std each."""
    rng = np.random.default_rng([seed, 0x5EED])
    grid = np.arange(_SIDE) / _SIDE
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    out = np.zeros((SYNTHETIC_CLASSES, 3, _SIDE, _SIDE))
    for c in range(SYNTHETIC_CLASSES):
        for ch in range(3):
            for _ in range(_WAVES):
                fy, fx = rng.integers(-3, 4, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                amp = rng.uniform(0.5, 1.0)
                out[c, ch] += amp * np.cos(2 * np.pi * (fy * yy + fx * xx) + phase)
        out[c] -= out[c].mean()
        out[c] /= out[c].std() + 1e-12
    return out


def _block(seed: int, split: int, index: int, templates: np.ndarray) -> tuple[np.ndarray, ...]:
    """One block of ``_BLOCK`` examples: ``(x float32 (B, 3, 32, 32), y int64 (B,))``."""
    rng = np.random.default_rng([seed, split, index])
    y = rng.integers(0, SYNTHETIC_CLASSES, size=_BLOCK)
    contrast = rng.uniform(0.6, 1.4, size=_BLOCK)
    shifts = rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(_BLOCK, 2))
    mixture = rng.standard_normal((_BLOCK, SYNTHETIC_CLASSES))
    noise = rng.standard_normal((_BLOCK, 3, _SIDE, _SIDE))
    signal = np.stack(
        [
            np.roll(templates[label], tuple(shift), axis=(1, 2))
            for label, shift in zip(y, shifts, strict=True)
        ]
    )
    clutter = np.einsum("bk,kchw->bchw", mixture, templates)
    x = 0.5 + _SIGNAL * contrast[:, None, None, None] * signal + _CLUTTER * clutter
    x += _NOISE * noise
    return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)


def _split(seed: int, split: int, n: int, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` examples of one split."""
    blocks = [_block(seed, split, i, templates) for i in range(-(-n // _BLOCK))]
    if not blocks:
        return np.zeros((0, 3, _SIDE, _SIDE), np.float32), np.zeros((0,), np.int64)
    x = np.concatenate([b[0] for b in blocks])[:n]
    y = np.concatenate([b[1] for b in blocks])[:n]
    return x, y


def synthetic32_arrays(
    seed: int = 0, n_train: int | None = None, n_test: int | None = None
) -> Arrays:
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 3, 32, 32)`` in ``[0, 1]``.

    Sizes default to 2048 train / 512 test; pass ``n_train`` / ``n_test`` for more or fewer.
    """
    templates = _templates(seed)
    x_train, y_train = _split(seed, 0, SYNTHETIC_TRAIN if n_train is None else n_train, templates)
    x_test, y_test = _split(seed, 1, SYNTHETIC_TEST if n_test is None else n_test, templates)
    return x_train, y_train, x_test, y_test
