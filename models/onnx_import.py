"""Read an ONNX export of an `nn.Sequential`-like stack as a layer list plus its weights (DESIGN §2).

Users bring models trained elsewhere; `torch.onnx.export` (the legacy TorchScript exporter or the
default dynamo one) is the common way out of PyTorch. A `.onnx` file is a protobuf: reading it
with `onnx.load` and `onnx.numpy_helper` runs no code and unpickles nothing, unlike a pickled
checkpoint. We never execute the graph (no onnxruntime here): we walk it, from the one graph
input to the one output, and map each operator onto a layer of models/layers.py:

    Conv                      → Conv2d      (symmetric pads, dilation 1, group 1)
    Gemm, MatMul [+ Add]      → Linear      (weight and bias from initializers)
    Relu                      → ReLU
    MaxPool, AveragePool      → MaxPool2d, AvgPool2d   (ceil_mode 0; padded averages count the padding)
    Flatten (axis 1), Reshape to a constant [batch, N]  → Flatten
    BatchNormalization        → BatchNorm1d / BatchNorm2d  (its running statistics; folded later)
    Dropout, Identity         → nothing (the identity at inference)

Anything else (another operator, a second input, a branch, a weight computed at run time) is an
ImportSpecError naming the member and what to change, so the served network is exactly the
exported one or nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from models.errors import ImportSpecError
from models.layers import check_layers, check_state, output_shape

SUPPORTED = (
    "Conv, Gemm, MatMul+Add, Relu, MaxPool, AveragePool, Flatten, Reshape, BatchNormalization, Dropout, Identity"
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONSTANT_OPS = ("Constant", "Identity")  # evaluated here when all their inputs are constants
_SKIPPED = ("Dropout", "Identity")


@dataclass(frozen=True)
class OnnxModel:
    layers: list[dict[str, Any]]  # checked layer list (check_layers output); may hold BatchNorm layers
    state: dict[str, torch.Tensor]  # keyed like build_sequential(layers).state_dict(), float32
    input: dict[str, Any]  # {"name": graph input name, "shape": [dims without batch], "datatype": "FP32"}
    classes: int  # size of the output's last dim


def read_onnx(path: Path, member: str) -> OnnxModel:
    """The layer list, weights, input contract and class count of the ONNX file at `path`;
    any problem is an ImportSpecError whose one-line message names `member`."""
    graph = _load(Path(path), member).graph
    consts = _constants(graph)
    name, shape, batch = _graph_input(graph, consts, member)
    output = _graph_output(graph, member)
    chain = _walk(graph, consts, name, output, member)
    builder = _Builder(member, consts, shape, batch)
    builder.add_all(chain, name)
    _no_strays(graph, consts, chain, name, output, member)
    if not builder.layers:
        raise ImportSpecError(
            f"member {member!r}: the graph has no layers (nothing but Dropout/Identity from {name!r} to {output!r})"
        )
    layers = _checked(member, builder.layers)
    classes = _classes(member, layers, shape, graph.output[0])
    check_state(member, layers, builder.state)
    return OnnxModel(layers, builder.state, {"name": name, "shape": list(shape), "datatype": "FP32"}, classes)


# --- the file and its graph's ends ---------------------------------------------------------------


def _load(path: Path, member: str) -> onnx.ModelProto:
    if not path.is_file():
        raise ImportSpecError(f"member {member!r}: ONNX file {str(path)!r} not found; give the path of a .onnx file")
    try:  # never follow external-data references: they could name any file on this machine
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, external-data errors, OSError: all mean "not a model we can read"
        detail = (str(exc).splitlines() or [""])[0]
        raise ImportSpecError(
            f"member {member!r}: {path.name!r} is not an ONNX model ({type(exc).__name__}: {detail}); "
            "export one with torch.onnx.export"
        ) from exc
    if not model.HasField("graph") or not model.graph.node:
        raise ImportSpecError(
            f"member {member!r}: {path.name!r} is not an ONNX model (it has no graph); "
            "export one with torch.onnx.export"
        )
    external = [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        _load_external(model, external, path, member)
    return model


def _load_external(model: onnx.ModelProto, external: list[onnx.TensorProto], path: Path, member: str) -> None:
    """Weights the exporter wrote beside the model (the dynamo exporter's default, `MODEL.onnx.data`):
    read only from plain file names in the model's own folder, never from a path the file names."""
    for init in external:
        location = {entry.key: entry.value for entry in init.external_data}.get("location", "")
        if not location or Path(location).name != location or location in (".", ".."):
            raise ImportSpecError(
                f"member {member!r}: {path.name!r} names its weights at {location!r}; only a file beside the "
                "model is read (or export with torch.onnx.export(..., external_data=False))"
            )
        if not (path.parent / location).is_file():
            raise ImportSpecError(
                f"member {member!r}: {path.name!r} keeps its weights in {location!r}, which is not beside it; "
                "copy that file too (or export with torch.onnx.export(..., external_data=False))"
            )
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # a truncated or mismatched data file
        detail = (str(exc).splitlines() or [""])[0]
        raise ImportSpecError(f"member {member!r}: cannot read {path.name!r}'s external weights ({detail})") from exc


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, plus the outputs of Constant nodes and of Identity nodes over constants (the
    legacy exporter's constant folding shares equal initializers through Identity nodes)."""
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # ONNX keeps nodes in topological order
        if node.op_type not in _CONSTANT_OPS or node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
        elif node.op_type == "Constant" and len(node.attribute) == 1:
            value = _constant_value(node.attribute[0])
            if value is not None:
                consts[node.output[0]] = value
    return consts


def _constant_value(attr: onnx.AttributeProto) -> np.ndarray | None:
    value = helper.get_attribute_value(attr)
    if attr.name == "value":
        return numpy_helper.to_array(value)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    return None  # strings and sparse tensors feed nothing we map


def _graph_input(
    graph: onnx.GraphProto, consts: dict[str, np.ndarray], member: str
) -> tuple[str, tuple[int, ...], int | None]:
    """→ (name, shape without batch, the batch dim if fixed)."""
    inputs = [i for i in graph.input if i.name not in consts]  # old exports list initializers as inputs too
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ImportSpecError(
            f"member {member!r}: the graph has {len(inputs)} inputs {names}; only single-input models import "
            "(export with one input tensor)"
        )
    value = inputs[0]
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ImportSpecError(f"member {member!r}: input {value.name!r} is not a tensor")
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ImportSpecError(
            f"member {member!r}: input {value.name!r} is {kind}; only FP32 (float32) inputs are served "
            "(export with a float32 sample input)"
        )
    if not tensor.HasField("shape") or len(tensor.shape.dim) < 2:
        rank = len(tensor.shape.dim) if tensor.HasField("shape") else "unknown"
        raise ImportSpecError(
            f"member {member!r}: input {value.name!r} has rank {rank}; it needs a batch dimension and at least "
            "one more (export with a sample input shaped [batch, ...])"
        )
    first, *rest = tensor.shape.dim
    shape = []
    for i, dim in enumerate(rest, start=1):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            label = dim.dim_param or "unknown"
            raise ImportSpecError(
                f"member {member!r}: input {value.name!r} dimension {i} is {label!r}; only the batch "
                "dimension (0) may be dynamic (fix the others in dynamic_axes/dynamic_shapes)"
            )
        shape.append(dim.dim_value)
    batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None
    return value.name, tuple(shape), batch


def _graph_output(graph: onnx.GraphProto, member: str) -> str:
    if len(graph.output) != 1:
        names = [o.name for o in graph.output]
        raise ImportSpecError(
            f"member {member!r}: the graph has {len(graph.output)} outputs {names}; only single-output models "
            "import (return one tensor of class scores)"
        )
    return graph.output[0].name


# --- the chain -----------------------------------------------------------------------------------


def _label(node: onnx.NodeProto) -> str:
    return f"node {node.name!r}" if node.name else f"the node making {node.output[0]!r}"


def _not_chain(member: str, problem: str) -> ImportSpecError:
    return ImportSpecError(
        f"member {member!r}: the graph is not a single chain of layers: {problem}; only nn.Sequential-like "
        "stacks import (no branches, skip connections or shape arithmetic)"
    )


def _walk(
    graph: onnx.GraphProto, consts: dict[str, np.ndarray], start: str, end: str, member: str
) -> list[onnx.NodeProto]:
    """The non-constant nodes from `start` to `end`, in order; each must be the only reader of the
    value before it and only its first output may be read."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if all(o in consts for o in node.output):
            continue
        for name in dict.fromkeys(i for i in node.input if i and i not in consts):
            consumers.setdefault(name, []).append(node)
    chain: list[onnx.NodeProto] = []
    seen: set[int] = set()
    current = start
    while current != end:
        readers = consumers.get(current, [])
        if not readers:
            raise _not_chain(member, f"value {current!r} feeds no node and is not the output {end!r}")
        if len(readers) > 1:
            names = ", ".join(f"{n.name or n.output[0]!r} ({n.op_type})" for n in readers)
            hint = (
                " (x.view(x.size(0), -1) reads the shape at run time: use nn.Flatten)"
                if any(n.op_type == "Shape" for n in readers)
                else ""
            )
            raise _not_chain(member, f"value {current!r} feeds {len(readers)} nodes: {names}{hint}")
        node = readers[0]
        if id(node) in seen:
            raise _not_chain(member, f"{_label(node)} ({node.op_type}) is reached twice (a cycle)")
        seen.add(id(node))
        for extra in node.output[1:]:
            if extra and (extra in consumers or extra == end):
                raise _not_chain(member, f"{_label(node)} ({node.op_type}) output {extra!r} is used")
        chain.append(node)
        current = node.output[0]
    if current in consumers:
        names = ", ".join(f"{n.name or n.output[0]!r}" for n in consumers[current])
        raise _not_chain(member, f"the output {end!r} also feeds {names}")
    return chain


def _no_strays(
    graph: onnx.GraphProto,
    consts: dict[str, np.ndarray],
    chain: list[onnx.NodeProto],
    start: str,
    end: str,
    member: str,
) -> None:
    on_chain = {id(node) for node in chain}
    for node in graph.node:
        if id(node) not in on_chain and not all(o in consts for o in node.output):
            raise _not_chain(member, f"{_label(node)} ({node.op_type}) is not on the path from {start!r} to {end!r}")


# --- operators → layers --------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _size(values: list[int]) -> int | list[int]:
    """[h, w] → the layer list's int when square, else [h, w]."""
    return values[0] if values[0] == values[1] else list(values)


def _spatial(sizes: tuple[int, ...], kernel: list[int], strides: list[int], pads: list[int]) -> tuple[int, ...]:
    """Height and width after a window (dilation 1, floor rounding), as torch computes them."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(sizes, kernel, strides, pads, strict=True))


class _Builder:
    """Maps chain nodes onto layers, tracking the activation shape (without batch)."""

    def __init__(self, member: str, consts: dict[str, np.ndarray], shape: tuple[int, ...], batch: int | None):
        self.member = member
        self.consts = consts
        self.shape = shape
        self.batch = batch
        self.layers: list[dict[str, Any]] = []
        self.state: dict[str, torch.Tensor] = {}

    # errors and parameters

    def error(self, node: onnx.NodeProto, problem: str) -> ImportSpecError:
        return ImportSpecError(f"member {self.member!r}: {node.op_type} {_label(node)}: {problem}")

    def param(self, node: onnx.NodeProto, index: int, what: str, required: bool = True) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            if required:
                raise self.error(node, f"has no {what} input")
            return None
        if name not in self.consts:
            raise self.error(
                node,
                f"its {what} {name!r} is computed at run time, not stored as an initializer; export with "
                "constant folding on (do_constant_folding=True, the default) and parameters as weights",
            )
        return self.consts[name]

    def weight(self, node: onnx.NodeProto, index: int, what: str, required: bool = True) -> np.ndarray | None:
        value = self.param(node, index, what, required)
        if value is None:
            return None
        if not np.issubdtype(value.dtype, np.floating):
            raise self.error(node, f"its {what} is {value.dtype}, not a floating-point tensor")
        return np.array(value, dtype=np.float32)

    def vector(self, node: onnx.NodeProto, value: np.ndarray, size: int, what: str) -> np.ndarray:
        """A bias-like constant that broadcasts along the last dimension only: [size], [1, size] or a scalar."""
        if value.ndim > len(self.shape) + 1 or any(d != 1 for d in value.shape[:-1]) or value.size not in (1, size):
            raise self.error(node, f"its {what} has shape {list(value.shape)}; expected [{size}]")
        return np.broadcast_to(value.reshape(-1), (size,)).astype(np.float32)

    def rank(self, node: onnx.NodeProto, rank: int, why: str) -> None:
        if len(self.shape) + 1 != rank:
            raise self.error(node, f"its input has shape [batch, {', '.join(map(str, self.shape))}]; {why}")

    def add(self, layer: dict[str, Any], **tensors: np.ndarray | torch.Tensor) -> None:
        index = len(self.layers)
        self.layers.append(layer)
        for key, value in tensors.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, dtype=np.float32))
            self.state[f"{index}.{key}"] = tensor.contiguous()

    # the walk

    def add_all(self, chain: list[onnx.NodeProto], start: str) -> None:
        i = 0
        while i < len(chain):
            node = chain[i]
            if node.domain not in _DEFAULT_DOMAINS or node.op_type not in _MAPPERS:
                op = f"{node.domain}.{node.op_type}" if node.domain not in _DEFAULT_DOMAINS else node.op_type
                raise ImportSpecError(
                    f"member {self.member!r}: ONNX operator {op!r} ({_label(node)}) is not supported; "
                    f"supported: {SUPPORTED}"
                )
            previous = chain[i - 1].output[0] if i else start
            if node.input[0] != previous:
                raise self.error(
                    node, f"the layer before it feeds a parameter input, not its data input 0 ({previous!r})"
                )
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            i += 1 + _MAPPERS[node.op_type](self, node, nxt)

    def conv(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        weight = self.weight(node, 1, "weight")
        assert weight is not None
        if weight.ndim != 4:
            raise self.error(node, f"only 2-D convolutions import (Conv2d); its weight has shape {list(weight.shape)}")
        self.rank(node, 4, "Conv2d needs [batch, channels, height, width]")
        attrs = _attrs(node)
        kernel = list(weight.shape[2:])
        if list(attrs.get("kernel_shape", kernel)) != kernel:
            raise self.error(
                node, f"kernel_shape {attrs['kernel_shape']} does not match its weight {list(weight.shape)}"
            )
        if attrs.get("group", 1) != 1:
            raise self.error(node, f"group={attrs['group']}: grouped/depthwise convolutions are not supported")
        strides, pads = self.window_attrs(node, attrs)
        out, channels = int(weight.shape[0]), int(weight.shape[1])
        if channels != self.shape[0]:
            raise self.error(node, f"its weight takes {channels} channels; its input has {self.shape[0]}")
        bias = self.weight(node, 2, "bias", required=False)
        layer = {
            "type": "Conv2d",
            "in_channels": channels,
            "out_channels": out,
            "kernel_size": _size(kernel),
            "stride": _size(strides),
            "padding": _size(pads),
            "bias": bias is not None,
        }
        tensors = {"weight": weight} | ({} if bias is None else {"bias": self.vector(node, bias, out, "bias")})
        self.add(layer, **tensors)
        self.shape = (out, *_spatial(self.shape[1:], kernel, strides, pads))
        return 0

    def window_attrs(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[list[int], list[int]]:
        """strides and (symmetric) pads of a 2-D Conv/pool; dilation 1, explicit padding."""
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise self.error(node, f"auto_pad={attrs['auto_pad']} is not supported; export with explicit padding")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise self.error(node, f"dilations {attrs['dilations']} are not supported; only dilation 1")
        strides = list(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(strides) != 2 or len(pads) != 4:
            raise self.error(node, f"strides {strides} / pads {pads} are not 2-D")
        if pads[:2] != pads[2:]:
            raise self.error(
                node, f"pads {pads} are not symmetric (begin {pads[:2]} != end {pads[2:]}); torch pads both sides"
            )
        return strides, pads[:2]

    def pool(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        kind = "MaxPool2d" if node.op_type == "MaxPool" else "AvgPool2d"
        self.rank(node, 4, f"{kind} needs [batch, channels, height, width]")
        attrs = _attrs(node)
        kernel = list(attrs.get("kernel_shape", []))
        if len(kernel) != 2:
            raise self.error(node, f"kernel_shape {kernel}: only 2-D pooling imports")
        if attrs.get("ceil_mode", 0) != 0:
            raise self.error(node, "ceil_mode=1 is not supported; use ceil_mode=False in torch")
        strides, pads = self.window_attrs(node, attrs)
        if kind == "AvgPool2d" and any(pads) and attrs.get("count_include_pad", 0) != 1:
            raise self.error(
                node,
                "padded average pooling with count_include_pad=0 is not supported; our AvgPool2d counts the padding",
            )
        self.add({"type": kind, "kernel_size": _size(kernel), "stride": _size(strides), "padding": _size(pads)})
        self.shape = (self.shape[0], *_spatial(self.shape[1:], kernel, strides, pads))
        return 0

    def gemm(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        attrs = _attrs(node)
        if attrs.get("transA", 0) != 0:
            raise self.error(node, "transA=1 is not supported")
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise self.error(
                node, f"alpha={attrs.get('alpha', 1.0)}, beta={attrs.get('beta', 1.0)}; only 1 and 1 import"
            )
        self.rank(node, 2, "Gemm needs [batch, features]")
        b = self.weight(node, 1, "weight")
        assert b is not None
        if b.ndim != 2:
            raise self.error(node, f"its weight has shape {list(b.shape)}; expected a matrix")
        weight = b if attrs.get("transB", 0) else b.T
        self.linear(node, weight, self.weight(node, 2, "bias", required=False))
        return 0

    def matmul(self, node: onnx.NodeProto, nxt: onnx.NodeProto | None) -> int:
        """MatMul by a constant [in, out] matrix, with the Add of a constant after it as the bias."""
        if len(self.shape) < 1:
            raise self.error(node, "its input has no feature dimension")
        b = self.weight(node, 1, "weight")
        assert b is not None
        if b.ndim != 2:
            raise self.error(node, f"its weight has shape {list(b.shape)}; expected an [in, out] matrix")
        bias = None
        if nxt is not None and nxt.op_type == "Add" and nxt.domain in _DEFAULT_DOMAINS:
            other = [i for i in nxt.input if i != node.output[0]]
            if len(other) != 1 or len(nxt.input) != 2:
                raise self.error(nxt, "expected the MatMul's output plus one bias")
            bias = self.weight(nxt, list(nxt.input).index(other[0]), "bias")
        self.linear(node, b.T, bias)
        return 0 if bias is None else 1

    def linear(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> None:
        out, features = (int(d) for d in weight.shape)
        if features != self.shape[-1]:
            raise self.error(node, f"its weight takes {features} features; its input has {self.shape[-1]}")
        layer = {"type": "Linear", "in_features": features, "out_features": out, "bias": bias is not None}
        tensors = {"weight": weight} | ({} if bias is None else {"bias": self.vector(node, bias, out, "bias")})
        self.add(layer, **tensors)
        self.shape = (*self.shape[:-1], out)

    def relu(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        self.add({"type": "ReLU"})
        return 0

    def flatten(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        axis = _attrs(node).get("axis", 1)
        if axis < 0:
            axis += len(self.shape) + 1
        if axis != 1:
            raise self.error(node, f"axis={axis}; only axis 1 (flatten all but the batch) imports")
        self.to_flat()
        return 0

    def reshape(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        target = self.param(node, 1, "shape")
        assert target is not None
        dims = [int(d) for d in np.asarray(target).reshape(-1)]
        features = math.prod(self.shape)
        zero_copies = not _attrs(node).get("allowzero", 0)
        first_ok = dims[:1] == [-1] or (dims[:1] == [0] and zero_copies) or dims[:1] in ([1], [self.batch])
        second_ok = dims[1:] == [features] or (dims[1:] == [-1] and dims[:1] != [-1])
        if len(dims) != 2 or not (first_ok and second_ok):
            raise self.error(
                node,
                f"shape {dims} does not flatten [batch, {', '.join(map(str, self.shape))}] to [batch, {features}]; "
                "only flattening reshapes import (x.flatten(1) or x.view(-1, N))",
            )
        self.to_flat()
        return 0

    def to_flat(self) -> None:
        self.add({"type": "Flatten"})
        self.shape = (math.prod(self.shape),)

    def batchnorm(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        """Uses the running statistics whatever `training_mode` says: they are what eval-mode torch uses."""
        rank = len(self.shape) + 1
        if rank not in (2, 3, 4):
            raise self.error(node, f"its input has rank {rank}; BatchNorm1d takes rank 2 or 3, BatchNorm2d rank 4")
        features = self.shape[0]
        tensors = {}
        for index, key in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
            value = self.weight(node, index, key)
            assert value is not None
            if value.shape != (features,):
                raise self.error(node, f"its {key} has shape {list(value.shape)}; its input has {features} channels")
            tensors[key] = value
        eps = float(np.format_float_scientific(np.float32(_attrs(node).get("epsilon", 1e-5)), unique=True))
        kind = "BatchNorm2d" if rank == 4 else "BatchNorm1d"
        self.add(
            {"type": kind, "num_features": features, "eps": eps},
            **tensors,
            num_batches_tracked=torch.tensor(0, dtype=torch.int64),
        )
        return 0

    def skip(self, node: onnx.NodeProto, _nxt: onnx.NodeProto | None) -> int:
        return 0


_MAPPERS = {
    "Conv": _Builder.conv,
    "Gemm": _Builder.gemm,
    "MatMul": _Builder.matmul,
    "Relu": _Builder.relu,
    "MaxPool": _Builder.pool,
    "AveragePool": _Builder.pool,
    "Flatten": _Builder.flatten,
    "Reshape": _Builder.reshape,
    "BatchNormalization": _Builder.batchnorm,
    **dict.fromkeys(_SKIPPED, _Builder.skip),
}


# --- the result ----------------------------------------------------------------------------------


def _checked(member: str, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        return check_layers(layers)
    except ImportSpecError as exc:
        raise ImportSpecError(f"member {member!r}: {exc}") from exc


def _classes(member: str, layers: list[dict[str, Any]], shape: tuple[int, ...], out: onnx.ValueInfoProto) -> int:
    try:
        result = output_shape(layers, shape)
    except ImportSpecError as exc:
        raise ImportSpecError(f"member {member!r}: {exc}") from exc
    if len(result) != 1:
        raise ImportSpecError(
            f"member {member!r}: the output {out.name!r} has shape [batch, {', '.join(map(str, result))}]; "
            "a classifier returns [batch, classes] (end the stack with a Linear layer)"
        )
    declared = list(out.type.tensor_type.shape.dim)
    if declared and declared[-1].HasField("dim_value") and declared[-1].dim_value != result[0]:
        raise ImportSpecError(
            f"member {member!r}: the output {out.name!r} declares {declared[-1].dim_value} classes; "
            f"its layers make {result[0]}"
        )
    return result[0]
