"""Reader (and writer) for the IDX format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number -- two zero bytes, a dtype code and the number of
dimensions -- then one big-endian ``uint32`` per dimension, then the values, big-endian,
row-major. Files may be gzip-compressed (recognised by content, not by name).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IDX_DTYPES",
    "IdxFormatError",
    "IdxSplit",
    "find_idx_split",
    "load_idx_split",
    "parse_idx",
    "read_idx",
    "write_idx",
]

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_GZIP_MAGIC = b"\x1f\x8b"

#: The four files of a standard split, by role.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class IdxFormatError(ValueError):
    """An IDX file is corrupt: bad magic number, truncated, or sizes that do not match."""


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) contents of ``path``."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path}: corrupt gzip stream ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one IDX file into a native-endian numpy array."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: {len(data)} bytes, too short for an IDX header")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0:
        raise IdxFormatError(
            f"{source}: bad magic number 0x{data[:4].hex()} (must start with two zero bytes);"
            " not an IDX file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IdxFormatError(f"{source}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(
            f"{source}: truncated header ({len(data)} bytes, {ndim} dims need {header})"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    count = 1
    for d in dims:
        count *= d
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: {what}: dims {dims} of {dtype.str} need {expected} bytes,"
            f" file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-endian numpy array.

    Raises :class:`IdxFormatError` when the file is corrupt.
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    codes = [c for c, n in IDX_DTYPES.items() if np.dtype(n).newbyteorder("=") == native]
    if not codes:
        raise ValueError(f"dtype {array.dtype} has no IDX code")
    code = codes[0]
    name = IDX_DTYPES[code]
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX holds 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.dtype(name)).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def _candidates(base: str) -> list[str]:
    """File names accepted for one IDX file: ``-idx`` or ``.idx`` spelling, plain or gz."""
    dotted = base.replace("-idx", ".idx")
    return [base, base + ".gz", dotted, dotted + ".gz"]


@dataclass(frozen=True)
class IdxSplit:
    """Paths of the four IDX files of a train/test split."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path


def find_idx_split(directory: Path) -> tuple[IdxSplit | None, list[str]]:
    """Look for the four standard IDX files directly in ``directory``.

    Returns the split (or None) and the list of missing file names when only some exist.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, base in IDX_FILES.items():
        for name in _candidates(base):
            candidate = directory / name
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(base + "[.gz]")
    if missing:
        return None, (missing if found else [])
    return IdxSplit(**found), []


def load_idx_split(
    split: IdxSplit, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and cross-check a split: ``(x_train, y_train, x_test, y_test)`` as uint8 arrays.

    Images are ``(N, H, W)``, labels ``(N,)``; counts must agree and labels lie in
    ``[0, num_classes)``.
    """
    out: list[np.ndarray] = []
    for images_path, labels_path in (
        (split.train_images, split.train_labels),
        (split.test_images, split.test_labels),
    ):
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxFormatError(
                f"{images_path}: expected a 3-d uint8 image array, got {images.dtype}"
                f" with shape {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise IdxFormatError(
                f"{labels_path}: expected a 1-d uint8 label array, got {labels.dtype}"
                f" with shape {labels.shape}"
            )
        if len(images) != len(labels):
            raise IdxFormatError(
                f"{images_path} holds {len(images)} images but {labels_path} holds"
                f" {len(labels)} labels"
            )
        if labels.size and int(labels.max()) >= num_classes:
            raise IdxFormatError(
                f"{labels_path}: label {int(labels.max())} outside [0, {num_classes})"
            )
        out += [images, labels]
    return out[0], out[1], out[2], out[3]
