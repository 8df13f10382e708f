"""CIFAR-10 from the official "python version" batches, unpickled safely.

``cifar-10-python.tar.gz`` extracts to ``cifar-10-batches-py/`` holding ``data_batch_1`` ..
``data_batch_5`` (10000 images each) and ``test_batch`` (10000). Each is a pickled dict with
``b"data"``: uint8 ``(N, 3072)`` (1024 red, then green, then blue values, row-major 32x32)
and ``b"labels"``: a list of N ints in 0..9.

Unpickling can run arbitrary code, so the batches are read with
:class:`RestrictedUnpickler`, which resolves only the few globals a numpy array needs
(``_reconstruct``/``_frombuffer``, ``ndarray``, ``dtype``, and ``_codecs.encode`` for latin-1)
and refuses every other global with :class:`pickle.UnpicklingError`.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kfe.data.dataset import Arrays

__all__ = [
    "CIFAR_DIRNAME",
    "CIFAR_TEST_BATCH",
    "CIFAR_TRAIN_BATCHES",
    "RestrictedUnpickler",
    "find_cifar10",
    "load_cifar10",
    "read_cifar_batch",
    "safe_load",
]

CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
_PIXELS = 3 * 32 * 32


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it: latin-1 text codecs only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-str")
    return codecs.encode(obj, encoding, errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may reference, resolved without ``import``-by-name."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, numbers and numpy arrays.

    Any global outside the allow-list (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` before it is looked up.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only when it is on the allow-list."""
        allowed = RestrictedUnpickler._ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR batches may only hold"
                " numpy arrays, dicts, lists, bytes and numbers"
            ) from None


def safe_load(handle: BinaryIO) -> Any:
    """Unpickle one object with :class:`RestrictedUnpickler` (py2 strings kept as bytes)."""
    return RestrictedUnpickler(handle, encoding="bytes").load()


def _field(batch: dict[Any, Any], key: str) -> Any:
    """``batch[b"key"]`` or ``batch["key"]``."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    Raises ValueError for a file that is not a well-formed CIFAR-10 batch (including one
    that references a forbidden global).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            batch = safe_load(handle)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a safe CIFAR-10 batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    try:
        data, labels = _field(batch, "data"), _field(batch, "labels")
    except KeyError as exc:
        raise ValueError(f"{path}: batch dict lacks the {exc} entry") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: b'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != _PIXELS:
        raise ValueError(f"{path}: b'data' rows hold {data.shape[1]} values, need {_PIXELS}")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(data) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must hold {len(data)} ints")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def find_cifar10(directory: Path) -> tuple[Path | None, list[str]]:
    """The folder holding the six batch files: ``<directory>/cifar-10-batches-py`` or
    ``<directory>`` itself. Also returns the missing file names of a partial folder.
    """
    names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    notes: list[str] = []
    for folder in (directory / CIFAR_DIRNAME, directory):
        present = [name for name in names if (folder / name).is_file()]
        if len(present) == len(names):
            return folder, []
        if present:
            missing = [name for name in names if name not in present]
            notes.append(f"{folder} lacks {', '.join(missing)}")
    return None, notes


def load_cifar10(folder: Path, train_limit: int | None = None) -> Arrays:
    """``(x_train, y_train, x_test, y_test)`` from the batch files in ``folder``.

    With ``train_limit`` only the batches needed for the first ``train_limit`` training
    examples are read (the caller still slices).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for name in CIFAR_TRAIN_BATCHES:
        if train_limit is not None and sum(len(y) for y in ys) >= train_limit:
            break
        x, y = read_cifar_batch(folder / name)
        xs.append(x)
        ys.append(y)
    x_test, y_test = read_cifar_batch(folder / CIFAR_TEST_BATCH)
    x_train = np.concatenate(xs) if xs else np.zeros((0, 3, 32, 32), np.uint8)
    y_train = np.concatenate(ys) if ys else np.zeros((0,), np.int64)
    return x_train, y_train, x_test, y_test
