"""Architectures as data: a layer list that builds an `nn.Sequential` (DESIGN §2).

A layer is `{"type": T, ...}` with the argument names of T's `torch.nn` constructor:

    Conv2d       in_channels, out_channels, kernel_size, [stride=1], [padding=0], [bias=true]
    Linear       in_features, out_features, [bias=true]
    ReLU
    MaxPool2d    kernel_size, [stride=kernel_size], [padding=0]
    AvgPool2d    kernel_size, [stride=kernel_size], [padding=0]
    Flatten
    BatchNorm1d  num_features, [eps=1e-5]      (import only: folded into the Conv2d/Linear before it)
    BatchNorm2d  num_features, [eps=1e-5]      (import only: folded)
    Dropout      [p=0.5]                       (import only: dropped, it is the identity in eval mode)

Weights are keyed exactly like that `nn.Sequential`'s `state_dict()` (`0.weight`, `1.running_mean`).
`normalise` turns an imported list and its weights into the served form: batch norms folded,
dropouts gone, every Conv2d/Linear with a bias. Serving, merging and refinement only ever see
Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d and Flatten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.errors import ImportSpecError


@dataclass(frozen=True)
class _Type:
    module: type[nn.Module]
    required: tuple[str, ...]
    optional: Mapping[str, Any]  # name → default (None: the constructor's own)


_PAIR = ("kernel_size", "stride", "padding")
TYPES: dict[str, _Type] = {
    "Conv2d": _Type(
        nn.Conv2d, ("in_channels", "out_channels", "kernel_size"), {"stride": 1, "padding": 0, "bias": True}
    ),
    "Linear": _Type(nn.Linear, ("in_features", "out_features"), {"bias": True}),
    "ReLU": _Type(nn.ReLU, (), {}),
    "MaxPool2d": _Type(nn.MaxPool2d, ("kernel_size",), {"stride": None, "padding": 0}),
    "AvgPool2d": _Type(nn.AvgPool2d, ("kernel_size",), {"stride": None, "padding": 0}),
    "Flatten": _Type(nn.Flatten, (), {}),
    "BatchNorm1d": _Type(nn.BatchNorm1d, ("num_features",), {"eps": 1e-5}),
    "BatchNorm2d": _Type(nn.BatchNorm2d, ("num_features",), {"eps": 1e-5}),
    "Dropout": _Type(nn.Dropout, (), {"p": 0.5}),
}
SERVED = ("Conv2d", "Linear", "ReLU", "MaxPool2d", "AvgPool2d", "Flatten")
_AFFINE = ("Conv2d", "Linear")


def _int(where: str, name: str, value: Any, low: int) -> int:
    if type(value) is not int or value < low:
        raise ImportSpecError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _pair(where: str, name: str, value: Any, low: int) -> int | list[int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise ImportSpecError(f"{where}: {name} must be an integer or a list of two, got {value!r}")
        return [_int(where, name, v, low) for v in value]
    return _int(where, name, value, low)


def check_layer(layer: Any, index: int) -> dict[str, Any]:
    """One layer spec, checked and with its defaults filled in; raises ImportSpecError naming it."""
    where = f"layers[{index}]"
    if not isinstance(layer, dict):
        raise ImportSpecError(f"{where} must be an object with a 'type', got {layer!r}")
    kind = layer.get("type")
    if kind not in TYPES:
        raise ImportSpecError(f"{where}: unsupported layer type {kind!r}; supported: {', '.join(TYPES)}")
    spec = TYPES[kind]
    where = f"{where} ({kind})"
    unknown = sorted(set(layer) - {"type", *spec.required, *spec.optional})
    if unknown:
        accepted = [*spec.required, *spec.optional] or "none"
        raise ImportSpecError(f"{where}: unknown arguments {unknown}; accepted: {accepted}")
    missing = [name for name in spec.required if name not in layer]
    if missing:
        raise ImportSpecError(f"{where}: missing arguments {missing}")
    out: dict[str, Any] = {"type": kind}
    for name in (*spec.required, *spec.optional):
        value = layer.get(name, spec.optional.get(name))
        if name == "stride" and value is None:
            value = out["kernel_size"]
        if name in _PAIR:
            value = _pair(where, name, value, 0 if name == "padding" else 1)
        elif name == "bias":
            if not isinstance(value, bool):
                raise ImportSpecError(f"{where}: bias must be true or false, got {value!r}")
        elif name in ("eps", "p"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ImportSpecError(f"{where}: {name} must be a number, got {value!r}")
            if not (0 <= value < 1 if name == "p" else value > 0):
                raise ImportSpecError(f"{where}: {name} out of range: {value!r}")
            value = float(value)
        else:
            value = _int(where, name, value, 1)
        out[name] = value
    return out


def check_layers(layers: Any) -> list[dict[str, Any]]:
    if not isinstance(layers, list) or not layers:
        raise ImportSpecError(f"layers must be a non-empty list of layer objects, got {type(layers).__name__}")
    return [check_layer(layer, i) for i, layer in enumerate(layers)]


def _module(layer: dict[str, Any]) -> nn.Module:
    spec = TYPES[layer["type"]]
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in layer.items() if k != "type"}
    return spec.module(**kwargs)


def build_sequential(layers: Sequence[dict[str, Any]]) -> nn.Sequential:
    """The `nn.Sequential` a (checked) layer list describes, freshly initialised."""
    return nn.Sequential(*(_module(layer) for layer in layers))


def output_shape(layers: Sequence[dict[str, Any]], input_shape: Sequence[int]) -> tuple[int, ...]:
    """Run one zero input through the layers (eval mode); the first layer that cannot take its
    input is named. → the output shape without the batch dimension."""
    h = torch.zeros(2, *input_shape)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            module = _module(layer).eval()
            try:
                h = module(h)
            except (RuntimeError, ValueError) as exc:
                first = str(exc).splitlines()[0]
                raise ImportSpecError(
                    f"layers[{i}] ({layer['type']}) cannot take an input of shape {list(h.shape[1:])}: {first}"
                ) from exc
    return tuple(h.shape[1:])


def expected_state(layers: Sequence[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """The `state_dict()` keys and shapes of the layer list (integer buffers included)."""
    return {k: tuple(v.shape) for k, v in build_sequential(layers).state_dict().items()}


def check_state(member: str, layers: Sequence[dict[str, Any]], state: Mapping[str, torch.Tensor]) -> None:
    """Missing, extra, mis-shaped or non-finite weights: an ImportSpecError naming member and key."""
    expected = expected_state(layers)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ImportSpecError(f"member {member!r}: missing weight {missing[0]!r} (the spec needs {len(expected)} keys)")
    extra = sorted(k for k in state if k not in expected)
    if extra:
        raise ImportSpecError(
            f"member {member!r}: unexpected weight {extra[0]!r}: not a key of the spec's nn.Sequential "
            f"(keys are like {next(iter(expected))!r})"
        )
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise ImportSpecError(
                f"member {member!r}: weight {key!r} has shape {list(tensor.shape)}, the spec needs {list(shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ImportSpecError(f"member {member!r}: weight {key!r} holds NaN or infinite values")


def normalise(
    layers: Sequence[dict[str, Any]], state: Mapping[str, torch.Tensor]
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Fold every batch norm into the Conv2d/Linear before it, drop dropouts, give every
    Conv2d/Linear a bias; → (served layers, their float32 state keyed by the new indices)."""
    out_layers: list[dict[str, Any]] = []
    out_state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        kind = layer["type"]
        params = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)}
        if kind == "Dropout":
            continue
        if kind.startswith("BatchNorm"):
            if not out_layers or out_layers[-1]["type"] not in _AFFINE:
                raise ImportSpecError(
                    f"layers[{i}] ({kind}) must follow a Conv2d or Linear to be folded into it "
                    f"(it follows {out_layers[-1]['type'] if out_layers else 'the input'})"
                )
            _fold(out_state, len(out_layers) - 1, params, float(layer["eps"]), i, kind)
            continue
        index = len(out_layers)
        if kind in _AFFINE:
            weight = params["weight"].to(torch.float64)
            bias = (
                params["bias"].to(torch.float64) if layer["bias"] else torch.zeros(weight.shape[0], dtype=torch.float64)
            )
            out_state[f"{index}.weight"], out_state[f"{index}.bias"] = weight, bias
            layer = {**layer, "bias": True}
        out_layers.append(dict(layer))
    return out_layers, {k: v.to(torch.float32).contiguous() for k, v in out_state.items()}


def _fold(
    state: dict[str, torch.Tensor], index: int, bn: dict[str, torch.Tensor], eps: float, at: int, kind: str
) -> None:
    """y = γ·(Wx + b − μ)/√(σ² + ε) + β  ⇒  W' = W·s, b' = (b − μ)·s + β with s = γ/√(σ² + ε), in float64."""
    weight, bias = state[f"{index}.weight"], state[f"{index}.bias"]
    if weight.shape[0] != bn["running_mean"].shape[0]:
        raise ImportSpecError(
            f"layers[{at}] ({kind}) has {bn['running_mean'].shape[0]} features; "
            f"the layer before it has {weight.shape[0]}"
        )
    scale = bn["weight"].to(torch.float64) / torch.sqrt(bn["running_var"].to(torch.float64) + eps)
    state[f"{index}.weight"] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    state[f"{index}.bias"] = (bias - bn["running_mean"].to(torch.float64)) * scale + bn["bias"].to(torch.float64)


def describe(model: nn.Sequential) -> list[dict[str, Any]]:
    """The layer list of an `nn.Sequential` of served layer types (our own networks, v1 bundles)."""
    layers: list[dict[str, Any]] = []
    for module in model.children():
        kind = type(module).__name__
        if kind not in SERVED:
            raise ImportSpecError(f"cannot describe a {kind} layer; served layers are {SERVED}")
        layer: dict[str, Any] = {"type": kind}
        if isinstance(module, nn.Conv2d):
            layer |= {
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": list(module.padding),
            }
        elif isinstance(module, nn.Linear):
            layer |= {"in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            layer |= {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding}
        layers.append(check_layer(layer, len(layers)))
    return layers
