"""scikit-learn's bundled handwritten digits: 1797 8x8 images, grey values 0..16, no download.

The split is fixed: the first 1500 images train, the last 297 test (the order of
:func:`sklearn.datasets.load_digits`, independent of any seed).
"""

from __future__ import annotations

import numpy as np

from kfe.data.dataset import Arrays

__all__ = ["DIGITS_MAX", "DIGITS_TEST_SIZE", "load_digits_arrays"]

#: Number of examples held out for test (the last ones).
DIGITS_TEST_SIZE = 297
#: Largest grey value; pixels are divided by it.
DIGITS_MAX = 16.0


def load_digits_arrays() -> Arrays:
    """``(x_train, y_train, x_test, y_test)`` with images ``(N, 1, 8, 8)`` in 0..16.

    Raises ImportError when scikit-learn is not installed.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    cut = len(x) - DIGITS_TEST_SIZE
    return x[:cut], y[:cut], x[cut:], y[cut:]
