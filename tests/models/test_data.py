from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from models.data import (
    NUM_CLASSES,
    class_histogram,
    dirichlet_shards,
    load_split,
    train_validation,
)
from models.errors import DatasetCorruptError, DatasetMissingError


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


def test_load_split_reads_the_real_test_images(test_split):
    assert test_split.images.shape == (10000, 1, 28, 28)
    assert test_split.images.dtype == np.float32
    assert test_split.labels.shape == (10000,)
    assert 0.0 <= test_split.images.min() and test_split.images.max() < 1.0
    assert class_histogram(test_split.labels) == [1000] * NUM_CLASSES


def test_pixels_lie_on_the_eight_plane_grid(test_split):
    scaled = test_split.images[:100] * 256
    assert np.array_equal(scaled, np.round(scaled))


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COINSERVE_DATA", str(tmp_path))
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_split("test")


def _write(folder: Path, name: str, payload: bytes, compress: bool = True) -> None:
    (folder / name).write_bytes(gzip.compress(payload) if compress else payload)


def test_file_that_is_not_gzip_is_reported_as_corrupt(tmp_path, monkeypatch):
    _write(tmp_path, "t10k-images-idx3-ubyte.gz", b"not gzip at all", compress=False)
    monkeypatch.setenv("COINSERVE_DATA", str(tmp_path))
    with pytest.raises(DatasetCorruptError, match="not a readable gzip file"):
        load_split("test")


def test_truncated_idx_is_reported_as_corrupt(tmp_path, monkeypatch):
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    _write(tmp_path, "t10k-images-idx3-ubyte.gz", header + bytes(100))
    monkeypatch.setenv("COINSERVE_DATA", str(tmp_path))
    with pytest.raises(DatasetCorruptError, match="header says"):
        load_split("test")


def test_wrong_magic_is_reported_as_corrupt(tmp_path, monkeypatch):
    _write(tmp_path, "t10k-images-idx3-ubyte.gz", (1234).to_bytes(4, "big") + bytes(20))
    monkeypatch.setenv("COINSERVE_DATA", str(tmp_path))
    with pytest.raises(DatasetCorruptError, match="magic number 2051"):
        load_split("test")


def test_unknown_split_name_is_refused():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split("dev")


def test_validation_split_is_deterministic_and_disjoint(test_split):
    a_train, a_val = train_validation(test_split, seed=3, size=1000)
    b_train, b_val = train_validation(test_split, seed=3, size=1000)
    assert np.array_equal(a_val.labels, b_val.labels) and np.array_equal(a_val.images, b_val.images)
    assert len(a_train) == 9000 and len(a_val) == 1000
    rows = {row.tobytes() for row in a_train.images.reshape(9000, -1)}
    assert sum(row.tobytes() in rows for row in a_val.images.reshape(1000, -1)) <= 5  # duplicates exist in the data


def test_dirichlet_shards_partition_the_indices_deterministically():
    labels = np.repeat(np.arange(NUM_CLASSES), 500)
    shards = dirichlet_shards(labels, k=4, alpha=0.5, seed=7)
    again = dirichlet_shards(labels, k=4, alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))


def test_small_alpha_skews_classes_and_large_alpha_does_not():
    labels = np.repeat(np.arange(NUM_CLASSES), 2000)

    def mean_max_class_fraction(alpha: float) -> float:
        shards = dirichlet_shards(labels, k=4, alpha=alpha, seed=0)
        return float(np.mean([np.bincount(labels[s], minlength=NUM_CLASSES).max() / len(s) for s in shards]))

    assert mean_max_class_fraction(0.1) > 0.3  # a few classes dominate each shard
    assert mean_max_class_fraction(1000.0) < 0.12  # close to the uniform 0.1


@pytest.mark.parametrize(("k", "alpha"), [(0, 1.0), (2, 0.0)])
def test_dirichlet_shards_refuse_bad_arguments(k, alpha):
    with pytest.raises(ValueError):
        dirichlet_shards(np.zeros(10, dtype=np.int64), k=k, alpha=alpha)
