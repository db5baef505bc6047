"""Bundles: a folder with `manifest.json` plus one `.safetensors` file per model, sha256-checked.

Bundles are the only thing that crosses from training to serving (DESIGN §2). The manifest states
the model contract (`input`, `output`, group `name`: protocol/spec.py) and the architecture as a
layer list (models/layers.py); every model file is keyed like that `nn.Sequential`'s
`state_dict()`. Tensors are read with safetensors from bytes whose hash has just been checked;
nothing is ever unpickled. Version-1 manifests (Fashion-MNIST bundles of `coinserve train` that
named an architecture and its config instead of a layer list) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import nn

from models.errors import BundleError, BundleHashError, ImportSpecError
from models.layers import SERVED, build_sequential, check_layers, describe
from models.networks import build, config_from_dict
from protocol.spec import FORMAT, FORMAT_V1, FORMATS, ModelSpec, SpecError, model_spec

MANIFEST = "manifest.json"
SECTIONS = ("base", "members", "coded")
_RETRAIN = "rebuild the bundle (`coinserve train --out DIR` or `coinserve import --out DIR ...`)"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target then rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(folder: Path, name: str, model: nn.Module) -> dict[str, str]:
    """Write `<name>.safetensors`; returns the manifest fields `file` and `sha256`."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"name": name})
    file = f"{name}.safetensors"
    _atomic_write(folder / file, data)
    return {"file": file, "sha256": sha256_bytes(data)}


def save_tensors(folder: Path, file: str, tensors: dict[str, Any]) -> dict[str, str]:
    """Write numpy arrays as `file` (safetensors); returns the manifest fields `file` and `sha256`."""
    from safetensors.numpy import save as save_numpy

    data = save_numpy({k: v for k, v in tensors.items()})
    _atomic_write(folder / file, data)
    return {"file": file, "sha256": sha256_bytes(data)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def spec(self) -> ModelSpec:
        """The model contract: group name, input spec, classes and labels."""
        return model_spec(self.manifest)

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The served layer list (a v1 manifest's architecture, described as one)."""
        if self.manifest["format"] == FORMAT_V1:
            cfg = config_from_dict(str(self.manifest["architecture"]), self.manifest["config"])
            return describe(build(str(self.manifest["architecture"]), cfg))
        return list(self.manifest["layers"])

    def new_model(self) -> nn.Sequential:
        """A freshly initialised network of the bundle's architecture (the parity model starts here)."""
        return build_sequential(self.layers)

    @property
    def member_names(self) -> list[str]:
        return [m["name"] for m in self.manifest["members"]]

    @property
    def coded(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("coded", []))

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of the base, a member or a coded model, by name."""
        for entry in self._entries():
            if entry["name"] == name:
                return entry
        known = ", ".join(e["name"] for e in self._entries())
        raise BundleError(f"bundle {self.path} has no model named {name!r}; it has: {known}")

    def _entries(self) -> list[dict[str, Any]]:
        base = [self.manifest["base"]] if self.manifest.get("base") else []
        return base + list(self.manifest["members"]) + self.coded

    def read_bytes(self, name: str) -> bytes:
        """The model file's bytes, refused unless their sha256 matches the manifest."""
        entry = self.entry(name)
        return self.read_file(str(entry["file"]), str(entry["sha256"]))

    def read_file(self, file: str, sha256: str) -> bytes:
        """A bundle file's bytes, refused unless their sha256 is the one given."""
        if Path(file).name != file:
            raise BundleError(f"bundle file {file!r} must be a plain file name inside the bundle")
        path = self.path / file
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; {_RETRAIN}")
        data = path.read_bytes()
        if sha256_bytes(data) != sha256:
            raise BundleHashError(
                f"bundle file {path} does not match its manifest sha256 (tampered or corrupt); "
                f"refusing to load it; {_RETRAIN}"
            )
        return data

    def load_state(self, name: str) -> dict[str, torch.Tensor]:
        data = self.read_bytes(name)
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as exc:
            raise BundleError(f"bundle file for {name!r} is not valid safetensors ({exc}); {_RETRAIN}") from exc

    def build_model(self, name: str) -> nn.Sequential:
        """An eval-mode network holding the named model's verified weights."""
        model = self.new_model()
        try:
            model.load_state_dict(self.load_state(name))
        except RuntimeError as exc:
            raise BundleError(f"weights of {name!r} do not fit the bundle architecture: {exc}") from exc
        return model.eval()

    def verify(self) -> None:
        """Check every file's hash; raises on the first mismatch."""
        for entry in self._entries():
            self.read_bytes(entry["name"])

    def save(self) -> None:
        write_manifest(self.path, self.manifest)


def open_bundle(folder: Path | str, verify: bool = True) -> Bundle:
    """Read and validate a bundle's manifest; with `verify`, hash-check every model file too."""
    path = Path(folder)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no bundle at {path}: {MANIFEST} not found; {_RETRAIN}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); {_RETRAIN}") from exc
    _check_manifest(manifest, manifest_path)
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify()
    return bundle


def _check_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise BundleError(f"{where} is not a manifest of {' or '.join(FORMATS)}; {_RETRAIN}")
    required = ("architecture", "config") if manifest["format"] == FORMAT_V1 else ("name", "input", "output", "layers")
    for key in (*required, "members"):
        if key not in manifest:
            raise BundleError(f"{where} lacks the key {key!r}; {_RETRAIN}")
    try:
        model_spec(manifest)
        if manifest["format"] == FORMAT:
            layers = check_layers(manifest["layers"])
            unserved = [layer["type"] for layer in layers if layer["type"] not in SERVED]
            if unserved:
                raise BundleError(f"{where}: layers {unserved} must be folded at import; served layers are {SERVED}")
    except (SpecError, ImportSpecError) as exc:
        raise BundleError(f"{where}: {exc}") from exc
    if not isinstance(manifest["members"], list) or not manifest["members"]:
        raise BundleError(f"{where}: 'members' must list at least one model")
    entries = list(manifest["members"]) + list(manifest.get("coded", []))
    for entry in entries:
        if not isinstance(entry, dict) or not {"name", "file", "sha256"} <= entry.keys():
            raise BundleError(f"{where}: every model entry needs name, file and sha256; got {entry!r}")
        if Path(entry["file"]).name != entry["file"]:
            raise BundleError(f"{where}: model file {entry['file']!r} must be a plain file name inside the bundle")
