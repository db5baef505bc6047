"""The model contract a bundle's manifest states (DESIGN §2), read without torch.

Gateway and workers take everything about the served model from here: the input tensor's name,
shape (without the batch dimension) and datatype, the class count and labels, and the group name.
Nothing else in `app/` or `workers/` knows which dataset a bundle came from.

Two manifest versions load. `coinserve-bundle/2` states the contract itself (`input`, `output`,
`name`). `coinserve-bundle/1` manifests were written by `coinserve train` before import existed:
every one is a Fashion-MNIST bundle, whose contract lay in `dataset` and `config`; they are read
as the group `fashion` they were always served as.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

FORMAT_V1 = "coinserve-bundle/1"
FORMAT = "coinserve-bundle/2"
FORMATS = (FORMAT_V1, FORMAT)
DATATYPES = ("FP32",)  # what the codec carries today; the import refuses others by name
_V1_GROUP = "fashion"
MAX_LABEL = 64


class SpecError(ValueError):
    """A manifest whose model contract is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    datatype: str = "FP32"
    range: tuple[float, float] | None = None  # [low, high] every value must lie in; None: unchecked

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def accepted(self) -> list[tuple[int, ...]]:
        """Per-row shapes a request may use: the stated one, without its size-1 dimensions, or flat."""
        return _accepted(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """As the manifest states it."""
        spec: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "datatype": self.datatype}
        if self.range is not None:
            spec["range"] = list(self.range)
        return spec

    def metadata(self) -> dict[str, Any]:
        """As OIP model metadata lists a tensor (name, datatype, shape): the batch dimension as -1.
        The range is not a tensor-metadata field; the model's metadata parameters carry it."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


@functools.cache
def _accepted(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    shapes = [shape, tuple(d for d in shape if d != 1), (math.prod(shape),)]
    return [s for i, s in enumerate(shapes) if s and s not in shapes[:i]]


@dataclass(frozen=True)
class ModelSpec:
    group: str
    input: InputSpec
    classes: int
    labels: tuple[str, ...]  # one per class, or empty

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else str(index)


def input_spec(value: Any, where: str = "input") -> InputSpec:
    """An input spec `{"name", "shape", "datatype", "range"?}`, checked; raises SpecError naming the field."""
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be an object with name, shape and datatype")
    unknown = sorted(set(value) - {"name", "shape", "datatype", "range"})
    if unknown:
        raise SpecError(f"{where} has unknown fields {unknown}; expected name, shape, datatype, range")
    name = value.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise SpecError(f"{where}.name must be a short non-empty string, got {name!r}")
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(type(d) is int and 1 <= d <= 1 << 16 for d in shape)
    ):
        raise SpecError(f"{where}.shape must list 1 to 4 positive dimensions (without the batch), got {shape!r}")
    if math.prod(shape) > 1 << 22:
        raise SpecError(f"{where}.shape {shape} holds more than {1 << 22} values per row")
    datatype = value.get("datatype", "FP32")
    if datatype not in DATATYPES:
        raise SpecError(f"{where}.datatype {datatype!r} is not supported; supported: {list(DATATYPES)}")
    return InputSpec(name, tuple(shape), datatype, input_range(value.get("range"), f"{where}.range"))


def input_range(value: Any, where: str = "input.range") -> tuple[float, float] | None:
    """`[low, high]`, two finite numbers with low < high (None: no range); raises SpecError."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or not value[0] < value[1]
    ):
        raise SpecError(f"{where} must be [low, high], two finite numbers with low < high, got {value!r}")
    return float(value[0]), float(value[1])


def labels_and_classes(labels: Any, classes: Any, where: str) -> tuple[int, tuple[str, ...]]:
    """`labels` (a list of strings) and/or `classes` (a count); at least one, and they must agree."""
    if labels is not None:
        if (
            not isinstance(labels, list)
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL and x.isprintable() for x in labels)
            or len(set(labels)) != len(labels)
        ):
            raise SpecError(f"{where}.labels must be a list of distinct short strings, got {labels!r}")
    if classes is not None and (type(classes) is not int or classes < 2):
        raise SpecError(f"{where}.classes must be an integer >= 2, got {classes!r}")
    if labels is None and classes is None:
        raise SpecError(f"{where} needs 'labels' (a list of class names) or 'classes' (their number)")
    if labels is not None and classes is not None and len(labels) != classes:
        raise SpecError(f"{where}: {len(labels)} labels but classes is {classes}")
    if labels is not None and len(labels) < 2:
        raise SpecError(f"{where}.labels must name at least 2 classes")
    if labels is not None:
        return len(labels), tuple(labels)
    assert isinstance(classes, int)
    return classes, ()


def group_name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise SpecError(f"the group name must be 1-64 letters, digits, '-', '_' or '.', got {value!r}")
    return value


def model_spec(manifest: Any) -> ModelSpec:
    """The contract of a v1 or v2 manifest. Raises SpecError naming what is missing."""
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SpecError(f"not a coinserve bundle manifest: format {found!r}, expected one of {list(FORMATS)}")
    if manifest["format"] == FORMAT_V1:
        dataset, config = manifest.get("dataset") or {}, manifest.get("config") or {}
        spec = input_spec({"name": "input", "shape": dataset.get("input_shape"), "datatype": "FP32"}, "dataset")
        classes, labels = labels_and_classes(dataset.get("classes"), config.get("classes"), "dataset")
        return ModelSpec(_V1_GROUP, spec, classes, labels)
    output = manifest.get("output")
    if not isinstance(output, dict):
        raise SpecError("the manifest lacks 'output' ({'classes': N, 'labels': [...]})")
    classes, labels = labels_and_classes(output.get("labels"), output.get("classes"), "output")
    return ModelSpec(group_name(manifest.get("name")), input_spec(manifest.get("input")), classes, labels)
