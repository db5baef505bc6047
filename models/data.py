"""Fashion-MNIST from its IDX files (numpy only), the validation split, and Dirichlet shards.

The files come from Debian's `dataset-fashion-mnist` package; `COINSERVE_DATA` overrides the folder.
Pixels are returned as float32 in [0, 1) as `uint8 / 256`, so that 8 bit-planes hold every pixel
exactly (DESIGN §1.2: the input is split into planes like the weights).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import DatasetCorruptError, DatasetMissingError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "COINSERVE_DATA"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (1, 28, 28)
PIXEL_SCALE = 256.0  # uint8 / 256 lies on the 2^-8 grid: 8 planes are exact
VALIDATION_SIZE = 5000
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FIX = "apt-get install dataset-fashion-mnist, or set COINSERVE_DATA to a folder holding the four IDX .gz files"


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 28, 28) float32 in [0, 1) and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetMissingError(f"dataset missing: {path} not found; {_FIX}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetCorruptError(f"dataset corrupt: {path} is not a readable gzip file ({exc}); {_FIX}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DatasetCorruptError(f"dataset corrupt: {path} lacks the IDX magic number {magic}; {_FIX}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise DatasetCorruptError(
            f"dataset corrupt: {path} holds {len(raw) - header} bytes, header says {dims}; {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(name: str, folder: Path | None = None) -> Split:
    """Read the `train` or `test` split of Fashion-MNIST."""
    if name not in _FILES:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(_FILES)}")
    folder = folder or data_dir()
    image_file, label_file = _FILES[name]
    images = _read_idx(folder / image_file, magic=2051, ndim=3)
    labels = _read_idx(folder / label_file, magic=2049, ndim=1)
    if len(images) != len(labels):
        raise DatasetCorruptError(f"dataset corrupt: {len(images)} images but {len(labels)} labels in {folder}; {_FIX}")
    x = (images.astype(np.float32) / PIXEL_SCALE)[:, None, :, :]  # (N, 1, 28, 28)
    return Split(x, labels.astype(np.int64))


def train_validation(train: Split, seed: int = 0, size: int = VALIDATION_SIZE) -> tuple[Split, Split]:
    """Carve a deterministic validation split out of train (a seeded permutation, last `size`)."""
    if not 0 < size < len(train):
        raise ValueError(f"validation size {size} must be between 1 and {len(train) - 1}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(np.sort(order[:-size])), train.subset(np.sort(order[-size:]))


def dirichlet_shards(labels: np.ndarray, k: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Split indices into k non-IID shards: each class is divided among shards by Dir(alpha) proportions.

    Small alpha gives skewed shards (each member sees mostly a few classes); large alpha tends to IID.
    Returns k sorted index arrays that partition range(len(labels)).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(members)).astype(int)
        for shard, part in zip(shards, np.split(members, cuts), strict=True):
            shard.append(part)
    return [np.sort(np.concatenate(parts)) for parts in shards]


def class_histogram(labels: np.ndarray) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=NUM_CLASSES)]
