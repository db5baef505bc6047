"""Where a bundle's data comes from: the inputs that build its coded models and the labelled sets
that evaluate them (`coinserve code`, `eval-coding`, `eval-refinement`, `up`'s example request).

- A bundle of `coinserve train` names its dataset (`"dataset": {"name": "fashion-mnist"}`): its
  calibration set is the validation split carved from Fashion-MNIST's train split, its selection
  set the rest of that validation split, its test set the test split, its unlabelled inputs the
  training images.
- A bundle of `coinserve import` carries its data in `data.safetensors` (sha256 in the manifest):
  `calibration` (unlabelled: the true Fisher, the Grams, temperatures and distillation need no
  labels) and, if the user gave `--eval X Y`, `eval_inputs`/`eval_labels`, split by a seeded
  permutation into a selection half (every choice) and a test half (every reported figure).

Every bundle also has a few example inputs (`examples.safetensors`) for people and the console.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as load_numpy

from models.bundle import Bundle
from models.data import Split, load_split, train_validation
from models.errors import BundleError

FASHION = "fashion-mnist"
DATA_FILE = "data.safetensors"
EXAMPLES_FILE = "examples.safetensors"
SELECTION_SEED = 0
_NO_EVAL = "it has no labelled evaluation set: import it again with --eval INPUTS.npy LABELS.npy"


@dataclass
class DataSource:
    """One bundle's data. Arrays are float32 inputs (N, *input shape) and int64 labels (N,)."""

    calibration: np.ndarray  # ordered: the first n are "the n calibration inputs"
    calibration_labels: np.ndarray | None  # only the empirical Fisher needs them
    unlabelled: np.ndarray  # what distillation and the parity model train on
    validation: Split | None  # choices; disjoint from calibration[:n] through `selection`
    test_loader: Callable[[], Split] | None  # reported figures, read only when asked for (never by choices)
    validation_overlaps_calibration: bool  # True: the validation split begins with the calibration set
    where: str

    def calibration_set(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        labels = None if self.calibration_labels is None else self.calibration_labels[:n]
        return self.calibration[:n], labels

    def unlabelled_set(self, n: int) -> np.ndarray:
        """The first n unlabelled inputs (0: the calibration set itself)."""
        return self.unlabelled[:n] if n else self.calibration

    def selection(self, calibration_used: int) -> Split:
        """Labelled inputs no fitted statistic saw: where methods and plans are compared and chosen."""
        if self.validation is None:
            raise BundleError(f"bundle {self.where} cannot choose between methods: {_NO_EVAL}")
        if not self.validation_overlaps_calibration:
            return self.validation
        return self.validation.subset(np.arange(calibration_used, len(self.validation)))

    @property
    def has_test(self) -> bool:
        return self.test_loader is not None

    def test_split(self, limit: int | None = None) -> Split:
        if self.test_loader is None:
            raise BundleError(f"bundle {self.where} cannot be evaluated: {_NO_EVAL}")
        test = self.test_loader()
        return test.head(limit) if limit else test


def dataset_name(bundle: Bundle) -> str | None:
    dataset = bundle.manifest.get("dataset")
    return str(dataset.get("name")) if isinstance(dataset, dict) and dataset.get("name") else None


def source(bundle: Bundle) -> DataSource:
    """The bundle's data source (the imported data is hash-checked before it is read)."""
    if "data" in bundle.manifest:
        return _imported(bundle)
    if dataset_name(bundle) == FASHION:
        return _fashion(bundle)
    raise BundleError(f"bundle {bundle.path} names no data: neither a 'data' file nor a known dataset")


def _fashion(bundle: Bundle) -> DataSource:
    train, validation = train_validation(load_split("train"))
    return DataSource(
        calibration=validation.images,
        calibration_labels=validation.labels,
        unlabelled=train.images,
        validation=validation,
        test_loader=lambda: load_split("test"),
        validation_overlaps_calibration=True,
        where=str(bundle.path),
    )


def read_tensors(bundle: Bundle, key: str) -> dict[str, np.ndarray]:
    """A data file the manifest names under `key` ({"file", "sha256"}), hash-checked, as numpy."""
    entry = bundle.manifest.get(key)
    if not isinstance(entry, dict) or not {"file", "sha256"} <= entry.keys():
        raise BundleError(f"bundle {bundle.path}: manifest key {key!r} must be {{'file': ..., 'sha256': ...}}")
    return load_numpy(bundle.read_file(str(entry["file"]), str(entry["sha256"])))


def _imported(bundle: Bundle) -> DataSource:
    data = read_tensors(bundle, "data")
    calibration = data["calibration"]
    validation = test = None
    if "eval_inputs" in data:
        validation, test = split_eval(Split(data["eval_inputs"], data["eval_labels"]))
    return DataSource(
        calibration=calibration,
        calibration_labels=None,
        unlabelled=calibration,
        validation=validation,
        test_loader=None if test is None else (lambda: test),
        validation_overlaps_calibration=False,
        where=str(bundle.path),
    )


def split_eval(labelled: Split, seed: int = SELECTION_SEED) -> tuple[Split, Split]:
    """A user's labelled set → (selection half, test half), by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(labelled))
    half = len(labelled) // 2
    return labelled.subset(np.sort(order[:half])), labelled.subset(np.sort(order[half:]))


def examples(bundle: Bundle) -> Split:
    """The bundle's example inputs (and their labels); a v1 Fashion-MNIST bundle's come from the
    test split."""
    if "examples" in bundle.manifest:
        data = read_tensors(bundle, "examples")
        return Split(data["inputs"], data.get("labels", np.full(len(data["inputs"]), -1, np.int64)))
    if dataset_name(bundle) == FASHION:
        return load_split("test").head(8)
    raise BundleError(f"bundle {bundle.path} has no example inputs")


def example_request(bundle: Bundle, index: int = 0) -> dict[str, Any]:
    """Example `index` as a ready-to-send V2 request body."""
    spec = bundle.spec
    inputs = examples(bundle).images[index : index + 1]
    return {
        "inputs": [
            {
                "name": spec.input.name,
                "shape": [1, *spec.input.shape],
                "datatype": spec.input.datatype,
                "data": inputs.astype(np.float32).ravel().tolist(),
            }
        ]
    }
