"""models/onnx_import.py: real `torch.onnx.export` files (both exporters) read back as layer lists
whose folded networks compute what the exported torch modules compute, and one-line errors for
the graphs we do not map (other operators, garbage, several inputs, branches, run-time weights)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.errors import ImportSpecError
from models.layers import build_sequential, normalise
from models.onnx_import import SUPPORTED, read_onnx

MEMBER = "member-0"


# --- models and exports ---------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))


def _small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    )


def _cifar_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=2),  # 16×16
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1),  # 8×8, the padding counted
        nn.Conv2d(6, 8, (3, 1), padding=(1, 0), bias=False),  # rectangular kernel, no bias
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),  # 8×8
        nn.AvgPool2d((2, 2)),  # 4×4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Sequential], tuple[int, ...], int]] = {
    "mlp": (_mlp, (16,), 5),
    "small-cnn": (_small_cnn, (1, 8, 8), 5),
    "cifar-cnn": (_cifar_cnn, (3, 32, 32), 10),
}


def _made(name: str, fresh_stats: bool = False) -> nn.Sequential:
    """The model with seeded weights and, unless `fresh_stats`, batch norms whose running statistics
    and affine parameters are far from the identity (so folding them is actually tested)."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    if not fresh_stats:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n) * 0.5)
                module.running_var.copy_(torch.rand(n) + 0.5)
                module.weight.data.copy_(torch.rand(n) + 0.5)
                module.bias.data.copy_(torch.randn(n) * 0.2)
    return model.eval()


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, exporter: str, **legacy: Any) -> Path:
    """Export with a batch of 2 and a dynamic batch dimension; the exporters' own warnings are
    theirs (the legacy one is deprecated), not the reader's, so they are silenced here."""
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                **legacy,
            )
        else:
            pytest.importorskip("onnxscript")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["pixels"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    return path


def _assert_same_outputs(model: nn.Module, path: Path, shape: tuple[int, ...], classes: int) -> list[str]:
    """read_onnx → normalise → build_sequential gives the eval-mode original's softmax; → layer types."""
    read = read_onnx(path, MEMBER)
    assert read.input == {"name": "pixels", "shape": list(shape), "datatype": "FP32"}
    assert read.classes == classes
    for key, tensor in read.state.items():
        assert tensor.dtype == (torch.int64 if key.endswith("num_batches_tracked") else torch.float32), key
    layers, state = normalise(read.layers, read.state)
    net = build_sequential(layers).eval()
    net.load_state_dict(state)
    x = torch.randn(7, *shape)  # another batch size than the export's
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), dim=1)
        got = torch.softmax(net(x), dim=1)
    assert got.shape == (7, classes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return [layer["type"] for layer in read.layers]


# --- 1. both exporters, eval mode ---------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_models_match_their_originals(tmp_path: Path, name: str, exporter: str) -> None:
    model = _made(name)
    _, shape, classes = MODELS[name]
    path = _export(model, shape, tmp_path / f"{name}.onnx", exporter)
    types = _assert_same_outputs(model, path, shape, classes)
    assert "Dropout" not in types
    assert types[-1] == "Linear"
    if name != "mlp":
        assert "Flatten" in types  # the legacy exporter's Flatten, the dynamo one's Reshape


# --- 2. batch norms the exporter keeps ----------------------------------------------------------


def _bn_modes(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    nodes = [n for n in graph.node if n.op_type == "BatchNormalization"]
    return [next((a.i for a in n.attribute if a.name == "training_mode"), 0) for n in nodes]


@pytest.mark.parametrize("name", ["mlp", "small-cnn", "cifar-cnn"])
def test_training_mode_export_keeps_batch_norm_and_folds_to_the_eval_model(tmp_path: Path, name: str) -> None:
    model = _made(name).train()
    _, shape, classes = MODELS[name]
    path = _export(model, shape, tmp_path / "train.onnx", "legacy", training=torch.onnx.TrainingMode.TRAINING)
    assert _bn_modes(path) and all(mode == 1 for mode in _bn_modes(path))  # BatchNormalization, training_mode=1
    # the traced training-mode forward updated the running statistics it exported: compare after it
    types = _assert_same_outputs(model, path, shape, classes)
    assert any(t.startswith("BatchNorm") for t in types)


def test_unfolded_eval_export_with_shared_initializers(tmp_path: Path) -> None:
    """Fresh batch norms without constant folding: the legacy exporter keeps BatchNormalization
    (training_mode 0) and shares the equal initializers through Identity nodes."""
    model = _made("small-cnn", fresh_stats=True)
    path = _export(model, (1, 8, 8), tmp_path / "nofold.onnx", "legacy", do_constant_folding=False)
    assert _bn_modes(path) == [0]
    assert "BatchNorm2d" in _assert_same_outputs(model, path, (1, 8, 8), 5)


def test_batch_norm_layer_and_state(tmp_path: Path) -> None:
    model = _made("mlp")
    read = read_onnx(_export(model, (16,), tmp_path / "mlp.onnx", "legacy"), MEMBER)
    assert [layer["type"] for layer in read.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert read.layers[1] == {"type": "BatchNorm1d", "num_features": 32, "eps": 1e-5}
    torch.testing.assert_close(read.state["1.running_mean"], model[1].running_mean)
    torch.testing.assert_close(read.state["1.running_var"], model[1].running_var)
    assert read.state["1.num_batches_tracked"].dtype == torch.int64


# --- 3. unsupported operators -------------------------------------------------------------------


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh])
def test_unsupported_operator_names_operator_and_member(tmp_path: Path, activation: type[nn.Module]) -> None:
    model = nn.Sequential(nn.Linear(16, 8), activation(), nn.Linear(8, 3)).eval()
    path = _export(model, (16,), tmp_path / "act.onnx", "legacy")
    with pytest.raises(ImportSpecError) as info:
        read_onnx(path, MEMBER)
    message = str(info.value)
    assert message.startswith(f"member {MEMBER!r}: ONNX operator {activation.__name__!r} (node '/1/")
    assert message.endswith(f"is not supported; supported: {SUPPORTED}")
    assert "\n" not in message


# --- 4. not ONNX at all --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [np.random.default_rng(0).bytes(512), b"", None], ids=["random", "empty", "missing"]
)
def test_garbage_or_missing_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImportSpecError, match=f"^member {MEMBER!r}: ") as info:
        read_onnx(path, MEMBER)
    assert "\n" not in str(info.value)
    assert ("not found" if content is None else "not an ONNX model") in str(info.value)


# --- 5. hand-built graphs -------------------------------------------------------------------------


def _value(name: str, dims: list[int | str], kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, dims)


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: dict[str, np.ndarray] | None = None,
) -> Path:
    initializers = [numpy_helper.from_array(v, k) for k, v in (weights or {}).items()]
    graph = helper.make_graph(nodes, "hand-built", inputs, outputs, initializer=initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _error(path: Path) -> str:
    with pytest.raises(ImportSpecError) as info:
        read_onnx(path, MEMBER)
    message = str(info.value)
    assert message.startswith(f"member {MEMBER!r}: ") and "\n" not in message
    return message


def _served(path: Path, x: np.ndarray) -> np.ndarray:
    read = read_onnx(path, MEMBER)
    layers, state = normalise(read.layers, read.state)
    net = build_sequential(layers).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_two_inputs(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    path = _save(tmp_path / "m.onnx", nodes, [_value("a", ["n", 4]), _value("b", ["n", 4])], [_value("y", ["n", 4])])
    assert "2 inputs ['a', 'b']" in _error(path)


def test_two_outputs(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    path = _save(tmp_path / "m.onnx", nodes, [_value("x", ["n", 4])], [_value("y", ["n", 4]), _value("z", ["n", 4])])
    assert "2 outputs" in _error(path)


def test_branching_graph(tmp_path: Path) -> None:
    """A skip connection: x feeds both the Gemm and the Add."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Add", ["x", "h"], ["y"])]
    weights = {"w": _rand(4, 4), "b": _rand(4)}
    path = _save(tmp_path / "m.onnx", nodes, [_value("x", ["n", 4])], [_value("y", ["n", 4])], weights)
    message = _error(path)
    assert "not a single chain" in message and "'x' feeds 2 nodes" in message


def test_stray_node(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["w"], ["unused"], name="stray")]
    path = _save(tmp_path / "m.onnx", nodes, [_value("x", ["n", 4])], [_value("y", ["n", 4])], {"w": _rand(4)})
    assert "node 'stray' (Relu) is not on the path" in _error(path)


def test_weight_computed_at_run_time(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["w0"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[3, 3], name="conv"),
        helper.make_node("Flatten", ["h"], ["y"]),
    ]
    path = _save(
        tmp_path / "m.onnx", nodes, [_value("x", ["n", 1, 3, 3])], [_value("y", ["n", 2])], {"w0": _rand(2, 1, 3, 3)}
    )
    message = _error(path)
    assert "node 'conv'" in message and "weight 'w' is computed at run time" in message


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (_value("x", ["n", 4], TensorProto.DOUBLE), "is DOUBLE; only FP32"),
        (_value("x", ["n"]), "has rank 1"),
        (_value("x", ["n", "features"]), "dimension 1 is 'features'"),
    ],
    ids=["double", "rank-1", "symbolic-features"],
)
def test_bad_input(tmp_path: Path, value: onnx.ValueInfoProto, needle: str) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    path = _save(tmp_path / "m.onnx", nodes, [value], [_value("y", ["n", 4], value.type.tensor_type.elem_type)])
    assert needle in _error(path)


def test_matmul_add_and_transposed_gemm(tmp_path: Path) -> None:
    """MatMul by [in, out] then Add(bias, ·) (the legacy exporter's order) is one Linear; Gemm with
    transB=0 another; a Constant [0, -1] Reshape is a Flatten; a fixed batch of 1 is dropped."""
    w1, b1, w2, b2 = _rand(12, 6), _rand(6), _rand(6, 3), _rand(1, 3)
    nodes = [
        helper.make_node("Constant", [], ["flat"], value=numpy_helper.from_array(np.array([0, -1], np.int64))),
        helper.make_node("Reshape", ["x", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "w1"], ["m"]),
        helper.make_node("Add", ["b1", "m"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("Gemm", ["i", "w2", "b2"], ["y"]),
    ]
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    path = _save(tmp_path / "m.onnx", nodes, [_value("x", [1, 3, 4])], [_value("y", [1, 3])], weights)
    read = read_onnx(path, MEMBER)
    assert [layer["type"] for layer in read.layers] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert read.input["shape"] == [3, 4] and read.classes == 3
    x = _rand(5, 3, 4)
    expected = np.maximum(x.reshape(5, 12) @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(_served(path, x), expected, atol=1e-5)


CONV_WEIGHT = _rand(2, 1, 3, 3)


def _conv_graph(path: Path, **attrs: Any) -> Path:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", **attrs),
        helper.make_node("Flatten", ["h"], ["y"]),
    ]
    return _save(path, nodes, [_value("x", ["n", 1, 4, 4])], [_value("y", ["n", "k"])], {"w": CONV_WEIGHT})


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ({"pads": [1, 1, 0, 0]}, "not symmetric"),
        ({"dilations": [2, 2]}, "dilations [2, 2]"),
        ({"group": 2}, "group=2"),
    ],
    ids=["asymmetric-pads", "dilated", "grouped"],
)
def test_conv_attributes_we_cannot_map(tmp_path: Path, attrs: dict[str, Any], needle: str) -> None:
    assert needle in _error(_conv_graph(tmp_path / "m.onnx", **attrs))


def test_conv_without_bias_and_not_a_classifier_output(tmp_path: Path) -> None:
    read = read_onnx(_conv_graph(tmp_path / "m.onnx", pads=[1, 1, 1, 1]), MEMBER)
    assert read.layers[0]["bias"] is False and read.classes == 32
    x = _rand(2, 1, 4, 4)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(CONV_WEIGHT), padding=1)
    np.testing.assert_allclose(_served(tmp_path / "m.onnx", x), expected.flatten(1).numpy(), atol=1e-5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    path = _save(
        tmp_path / "conv.onnx", nodes, [_value("x", ["n", 1, 4, 4])], [_value("y", ["n", 2, 2, 2])], {"w": CONV_WEIGHT}
    )
    assert "a classifier returns [batch, classes]" in _error(path)


def test_average_pool_that_does_not_count_padding(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("AveragePool", ["x"], ["h"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["h"], ["y"]),
    ]
    path = _save(tmp_path / "m.onnx", nodes, [_value("x", ["n", 1, 4, 4])], [_value("y", ["n", 9])])
    assert "count_include_pad=0" in _error(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "absent.bin"])
def test_external_weights_are_read_only_from_beside_the_model(tmp_path, location):
    """A graph may keep its weights in a file beside it (the dynamo exporter's default); it must
    not make the importer read any other file."""
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [2, 4], np.zeros(8, np.float32).tobytes(), raw=True)
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        weight.external_data.add(key=key, value=value)
    node = onnx.helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    with pytest.raises(ImportSpecError, match="member 'm'") as refused:
        read_onnx(path, "m")
    assert "beside" in str(refused.value)
