"""Bundles: a folder with `manifest.json` plus one `.safetensors` file per model, sha256-checked.

Bundles are the only thing that crosses from training to serving (DESIGN §2). Tensors are read
with safetensors from bytes whose hash has just been checked; nothing is ever unpickled.
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

from models.errors import BundleError, BundleHashError
from models.networks import build, config_from_dict

MANIFEST = "manifest.json"
FORMAT = "coinserve-bundle/1"
SECTIONS = ("base", "members", "coded")
_RETRAIN = "run `coinserve train --out DIR` to rebuild the bundle"


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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def architecture(self) -> str:
        return str(self.manifest["architecture"])

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
        path = self.path / str(entry["file"])
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; {_RETRAIN}")
        data = path.read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
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
        model = build(self.architecture, config_from_dict(self.architecture, self.manifest["config"]))
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a {FORMAT} manifest; {_RETRAIN}")
    for key in ("architecture", "config", "members"):
        if key not in manifest:
            raise BundleError(f"{where} lacks the key {key!r}; {_RETRAIN}")
    entries = list(manifest["members"]) + list(manifest.get("coded", []))
    for entry in entries:
        if not isinstance(entry, dict) or not {"name", "file", "sha256"} <= entry.keys():
            raise BundleError(f"{where}: every model entry needs name, file and sha256; got {entry!r}")
        if Path(entry["file"]).name != entry["file"]:
            raise BundleError(f"{where}: model file {entry['file']!r} must be a plain file name inside the bundle")
