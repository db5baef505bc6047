"""`coinserve import`: a user's own k models → a bundle (DESIGN §2).

Members come as PyTorch state dicts saved with safetensors plus a layer spec, or as ONNX files
exported from PyTorch. Every member is checked against the architecture (missing, extra or
mis-shaped keys, non-finite values: each an ImportSpecError naming the member and the key), batch
norms are folded into the layer before them and dropouts dropped, and the folded network is checked
against the original on calibration inputs. The bundle is written into a temporary folder beside
`--out` and renamed into place at the end, so a failure leaves nothing behind. Nothing is ever
unpickled: `.pt`/`.pth`/`.pkl` files are refused with the two lines that save a state dict instead.

A spec file: `{"input": {"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32"},
"labels": ["0", ...] or "classes": 10, "layers": [{"type": "Conv2d", ...}, ...], "name": "digits"}`
(`name` optional; models/layers.py lists the layer types).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors

from models.bitplanes import RefinementPlan
from models.bundle import save_tensors, sha256_bytes, write_manifest
from models.data import Split
from models.errors import ImportSpecError
from models.layers import build_sequential, check_layers, check_state, normalise, output_shape
from models.sources import DATA_FILE, EXAMPLES_FILE, split_eval
from protocol.spec import FORMAT, InputSpec, SpecError, group_name, input_range, input_spec, labels_and_classes

PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
SAVE_HINT = (
    "coinserve never unpickles files; save the state dict with safetensors instead: "
    "`from safetensors.torch import save_file; save_file(model.state_dict(), 'member.safetensors')`"
)
SPEC_KEYS = ("input", "labels", "classes", "layers", "name")
MIN_CALIBRATION = 8
EXAMPLES = 8
FOLD_TOLERANCE = 1e-4  # the folded network's probabilities may differ from the original's by this much


@dataclass(frozen=True)
class Spec:
    input: InputSpec
    classes: int
    labels: tuple[str, ...]
    layers: list[dict[str, Any]] | None  # None: an ONNX import without layers in its spec
    name: str | None


@dataclass
class Member:
    name: str
    source: Path
    kind: str  # "safetensors" | "onnx"
    layers: list[dict[str, Any]]  # as imported (batch norms and dropouts still in)
    state: dict[str, torch.Tensor]
    source_sha256: str  # of the file as given, recorded in the manifest
    onnx_input: InputSpec | None = None  # an ONNX member's graph input ...
    onnx_classes: int = 0  # ... and class count


def parse_spec(value: Any, where: str, need_layers: bool = True) -> Spec:
    """A layer spec (parsed JSON) → Spec; raises ImportSpecError naming the field."""
    if not isinstance(value, dict):
        raise ImportSpecError(f"{where}: a spec must be a JSON object with input, labels or classes, and layers")
    unknown = sorted(set(value) - set(SPEC_KEYS))
    if unknown:
        raise ImportSpecError(f"{where}: unknown keys {unknown}; a spec has {list(SPEC_KEYS)}")
    try:
        spec_input = input_spec(value.get("input"))
        classes, labels = labels_and_classes(value.get("labels"), value.get("classes"), "spec")
        name = None if value.get("name") is None else group_name(value.get("name"))
    except SpecError as exc:
        raise ImportSpecError(f"{where}: {exc}") from exc
    layers = None
    if "layers" in value or need_layers:
        try:
            layers = check_layers(value.get("layers"))
        except ImportSpecError as exc:
            raise ImportSpecError(f"{where}: {exc}") from exc
        _check_output(layers, spec_input.shape, classes, where)
    return Spec(spec_input, classes, labels, layers, name)


def read_spec(path: Path, need_layers: bool = True) -> Spec:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportSpecError(f"cannot read the spec {path}: {exc}") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportSpecError(f"spec {path} is not valid JSON: {exc}") from exc
    return parse_spec(value, f"spec {path}", need_layers)


def _check_output(layers: list[dict[str, Any]], shape: Sequence[int], classes: int, where: str) -> None:
    try:
        out = output_shape(layers, shape)
    except ImportSpecError as exc:
        raise ImportSpecError(f"{where}: {exc}") from exc
    if out != (classes,):
        raise ImportSpecError(
            f"{where}: the layers turn an input of shape {list(shape)} into {list(out)}, not the [{classes}] "
            "class scores the labels/classes ask for"
        )


def _refuse_pickles(member: str, path: Path) -> None:
    if path.suffix.lower() in PICKLES:
        raise ImportSpecError(f"member {member!r}: {path.name} looks like a pickle ({path.suffix}); {SAVE_HINT}")


def _read(member: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImportSpecError(f"member {member!r}: cannot read {path}: {exc.strerror or exc}") from exc


def read_state_member(name: str, path: Path, spec: Spec) -> Member:
    """A state dict saved with safetensors, checked against the spec's layers."""
    _refuse_pickles(name, path)
    data = _read(name, path)
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImportSpecError(f"member {name!r}: {path.name} is not a safetensors file ({first}); {SAVE_HINT}") from exc
    assert spec.layers is not None
    _check_dtypes(name, state)
    check_state(name, spec.layers, state)
    return Member(name, path, "safetensors", spec.layers, state, sha256_bytes(data))


def _check_dtypes(name: str, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        integer_ok = key.endswith("num_batches_tracked")
        if not (tensor.is_floating_point() or (integer_ok and not tensor.is_complex())):
            raise ImportSpecError(f"member {name!r}: weight {key!r} has dtype {tensor.dtype}; weights must be floats")


def read_onnx_member(name: str, path: Path) -> Member:
    from models.onnx_import import read_onnx  # the onnx package only when an ONNX file is imported

    _refuse_pickles(name, path)
    if not path.is_file():
        raise ImportSpecError(f"member {name!r}: {path} not found")
    model = read_onnx(path, name)
    digest = sha256_bytes(_read(name, path))
    return Member(name, path, "onnx", model.layers, model.state, digest, input_spec(model.input), model.classes)


def read_array(path: Path, what: str, floats: bool = True) -> np.ndarray:
    """An .npy file, without pickles; floats as float32."""
    if path.suffix.lower() in PICKLES:
        raise ImportSpecError(f"{what}: {path.name} looks like a pickle; save arrays with numpy.save as .npy")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ImportSpecError(f"{what}: {path} not found") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise ImportSpecError(f"{what}: {path} is not a .npy array file without pickles ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise ImportSpecError(f"{what}: {path} holds several arrays (.npz); give one .npy array")
    if floats:
        if array.dtype.kind != "f":
            raise ImportSpecError(f"{what}: {path} holds {array.dtype} values; inputs must be floats (float32)")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ImportSpecError(f"{what}: {path} holds NaN or infinite values")
    return np.ascontiguousarray(array)


def read_inputs(path: Path, what: str, shape: Sequence[int]) -> np.ndarray:
    array = read_array(path, what)
    if tuple(array.shape[1:]) != tuple(shape) or array.ndim != len(shape) + 1:
        raise ImportSpecError(
            f"{what}: {path} has shape {list(array.shape)}; the model's input needs [N, {', '.join(map(str, shape))}]"
        )
    return array


def read_labels(path: Path, count: int, classes: int) -> np.ndarray:
    labels = read_array(path, "--eval labels", floats=False)
    if labels.dtype.kind not in "iu":
        raise ImportSpecError(f"--eval labels: {path} holds {labels.dtype} values; labels must be integers")
    if labels.shape != (count,):
        raise ImportSpecError(f"--eval labels: {path} has shape {list(labels.shape)}; the inputs need [{count}]")
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise ImportSpecError(f"--eval labels: {path} holds labels outside 0..{classes - 1}")
    return labels.astype(np.int64)


def _member_names(pairs: Sequence[tuple[str, Path]]) -> None:
    names = [n for n, _ in pairs]
    for name in names:
        try:
            group_name(name)
        except SpecError as exc:
            raise ImportSpecError(f"member name {name!r}: {exc}".replace("the group name", "a member name")) from exc
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ImportSpecError(f"member names must be distinct: {repeated} given twice")
    if len(names) < 2:
        raise ImportSpecError(f"coded inference needs at least 2 members; got {len(names)}")


def _onnx_spec(members: list[Member], given: Spec | None) -> Spec:
    first = members[0]
    spec_input, classes = first.onnx_input, first.onnx_classes
    assert spec_input is not None
    for member in members[1:]:
        if member.layers != first.layers:
            raise ImportSpecError(f"member {member.name!r}: its ONNX graph's layers differ from {first.name!r}'s")
        if member.onnx_input != spec_input:
            raise ImportSpecError(f"member {member.name!r}: its ONNX input differs from {first.name!r}'s")
    if given is None:
        return Spec(spec_input, classes, (), first.layers, None)
    if given.input.shape != spec_input.shape or given.classes != classes:
        raise ImportSpecError(
            f"member {first.name!r}: the ONNX model takes {list(spec_input.shape)} and gives {classes} classes; "
            f"the spec says {list(given.input.shape)} and {given.classes}"
        )
    return Spec(given.input, classes, given.labels, first.layers, given.name)


def _served(member: Member, calibration: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Fold and drop; check the folded network against the original on calibration inputs."""
    try:
        layers, state = normalise(member.layers, member.state)
    except ImportSpecError as exc:
        raise ImportSpecError(f"member {member.name!r}: {exc}") from exc
    original = build_sequential(member.layers)
    original.load_state_dict(member.state)
    folded = build_sequential(layers)
    folded.load_state_dict(state)
    x = torch.from_numpy(calibration[:64])
    with torch.no_grad():
        before = torch.softmax(original.float().eval()(x), dim=1)
        after = torch.softmax(folded.eval()(x), dim=1)
    gap = float((before - after).abs().max())
    if not gap <= FOLD_TOLERANCE:
        raise ImportSpecError(f"member {member.name!r}: folding changed its probabilities by {gap:.2e}")
    return layers, state


def import_bundle(
    out: Path,
    calibration_path: Path,
    spec_path: Path | None = None,
    members: Sequence[tuple[str, Path]] = (),
    onnx: Sequence[tuple[str, Path]] = (),
    eval_paths: tuple[Path, Path] | None = None,
    name: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    valid_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Check, fold and write the bundle atomically; → its manifest. `valid_range` is the input's
    [low, high] (`--input-range`; it overrides the spec's): the gateway refuses values outside it."""
    start = time.perf_counter()
    if bool(members) == bool(onnx):
        raise ImportSpecError(
            "give the members either as --member NAME=WEIGHTS.safetensors or as --onnx NAME=MODEL.onnx"
        )
    if members and spec_path is None:
        raise ImportSpecError("--member state dicts need --spec SPEC.json (the layer list they are keyed by)")
    pairs = list(members or onnx)
    _member_names(pairs)
    out = Path(out)
    if out.exists() and not force:
        raise ImportSpecError(f"{out} exists: remove it, choose another --out, or pass --force to replace it")
    given = read_spec(spec_path, need_layers=bool(members)) if spec_path is not None else None
    if members:
        assert given is not None
        loaded = [read_state_member(n, Path(p), given) for n, p in pairs]
        spec = given
    else:
        loaded = [read_onnx_member(n, Path(p)) for n, p in pairs]
        spec = _onnx_spec(loaded, given)
    if valid_range is not None:
        try:
            spec = replace(spec, input=replace(spec.input, range=input_range(list(valid_range), "--input-range")))
        except SpecError as exc:
            raise ImportSpecError(str(exc)) from exc
    calibration = read_inputs(Path(calibration_path), "--calibration", spec.input.shape)
    if len(calibration) < MIN_CALIBRATION:
        raise ImportSpecError(f"--calibration: {len(calibration)} inputs; at least {MIN_CALIBRATION} are needed")
    labelled = None
    if eval_paths is not None:
        eval_x = read_inputs(Path(eval_paths[0]), "--eval inputs", spec.input.shape)
        labelled = Split(eval_x, read_labels(Path(eval_paths[1]), len(eval_x), spec.classes))
        if len(labelled) < 4:
            raise ImportSpecError(f"--eval: {len(labelled)} labelled inputs; at least 4 are needed")
    served = [_served(m, calibration) for m in loaded]
    group = name or spec.name or _default_name(out)
    try:
        group_name(group)
    except SpecError as exc:
        raise ImportSpecError(f"--name: {exc}") from exc
    log(f"checked {len(loaded)} members ({loaded[0].kind}): {_summary(loaded[0].layers, served[0][0])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.importing-"))
    try:
        manifest = _write(staging, group, spec, loaded, served, calibration, labelled, log)
        manifest["import"]["seconds"] = round(time.perf_counter() - start, 3)
        write_manifest(staging, manifest)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"bundle written to {out} (group {group!r}, {len(loaded)} members) in {time.perf_counter() - start:.1f} s")
    return manifest


def _default_name(out: Path) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in out.resolve().name)[:64]
    return cleaned.strip("-.") or "models"


def _summary(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    folded = sum(layer["type"].startswith("BatchNorm") for layer in before)
    dropped = sum(layer["type"] == "Dropout" for layer in before)
    return f"{len(before)} layers, {folded} batch norm(s) folded, {dropped} dropout(s) dropped → {len(after)} served"


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the finished bundle into place; an old one (with --force) is moved aside first."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
        os.replace(out, old / "bundle")
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old / "bundle", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write(
    folder: Path,
    group: str,
    spec: Spec,
    loaded: list[Member],
    served: list[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]],
    calibration: np.ndarray,
    labelled: Split | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    layers = served[0][0]
    validation, test = split_eval(labelled) if labelled is not None else (None, None)
    entries = []
    for member, (_, state) in zip(loaded, served, strict=True):
        data = save_safetensors(state, metadata={"name": member.name})
        file = f"{member.name}.safetensors"
        (folder / file).write_bytes(data)
        entry: dict[str, Any] = {
            "name": member.name,
            "file": file,
            "sha256": sha256_bytes(data),
            "source": {
                "kind": member.kind,
                "file": member.source.name,
                "sha256": member.source_sha256,
            },
        }
        if test is not None:
            entry["test_accuracy"] = _accuracy(layers, state, test)
            log(f"  {member.name}: test accuracy {entry['test_accuracy']:.4f} ({len(test)} held-out inputs)")
        entries.append(entry)
    tensors = {"calibration": calibration}
    if labelled is not None:
        tensors |= {"eval_inputs": labelled.images, "eval_labels": labelled.labels}
    shown = labelled if labelled is not None else Split(calibration, np.full(len(calibration), -1, np.int64))
    plan, choice = _plan(layers, served[0][1], validation)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "name": group,
        "input": spec.input.to_dict(),
        "output": {"classes": spec.classes, "labels": list(spec.labels)} if spec.labels else {"classes": spec.classes},
        "layers": layers,
        "members": entries,
        "coded": [],
        "refinement": plan.to_dict(),
        "refinement_choice": choice,
        "data": {
            **save_tensors(folder, DATA_FILE, tensors),
            "calibration": len(calibration),
            "eval": 0 if labelled is None else len(labelled),
            "selection_seed": 0,
        },
        "examples": {
            **save_tensors(
                folder, EXAMPLES_FILE, {"inputs": shown.images[:EXAMPLES], "labels": shown.labels[:EXAMPLES]}
            ),
            "count": min(EXAMPLES, len(shown)),
            "split": "eval" if labelled is not None else "calibration",
        },
        "import": {"layers": loaded[0].layers, "kinds": sorted({m.kind for m in loaded})},
    }


def _model(layers: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    model = build_sequential(layers)
    model.load_state_dict(state)
    return model.eval()


def _accuracy(layers: list[dict[str, Any]], state: dict[str, torch.Tensor], split: Split) -> float:
    with torch.no_grad():
        predicted = _model(layers, state)(torch.from_numpy(split.images)).argmax(1).numpy()
    return float(np.mean(predicted == split.labels))


def _plan(
    layers: list[dict[str, Any]], state: dict[str, torch.Tensor], validation: Split | None
) -> tuple[RefinementPlan, dict[str, Any]]:
    """The served refinement plan, chosen on the selection half of --eval (the default plan without it)."""
    if validation is None:
        return RefinementPlan(), {"split": None, "reason": "no labelled --eval set: the default plan"}
    from models.selection import choose_plan  # selection imports training code: load it only here

    plan, ladder = choose_plan(_model(layers, state), validation)
    return plan, {"split": "eval selection half", "images": len(validation), "ladder": ladder}
