"""The served group, read from the bundle manifest (JSON only: the gateway never loads torch)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from app.decoding import Decoder
from app.settings import GatewaySettings
from protocol.spec import ModelSpec, SpecError, model_spec


class GroupConfigError(Exception):
    """The bundle or the replica list cannot form a servable group."""


@dataclass(frozen=True)
class Group:
    name: str
    members: list[str]
    coded: dict[str, int]  # coded model name → coefficient row
    coeffs: np.ndarray | None  # (r, k)
    resolutions: int  # the plan's resolutions, float32 included
    planes: list[int | None]
    spec: ModelSpec  # the manifest's contract: input name, shape and datatype, classes and labels
    urls: dict[str, str]  # replica name → tcp://HOST:PORT, its channel address
    hedge_url: str | None = None  # a replica hosting every member, for the hedged-request baseline
    hedge_quantile: float = 0.95
    manifest_sha256: str | None = None  # of the manifest's bytes: a replica must report the same (DESIGN §3)
    version: str = "1"  # the OIP model version: the manifest's `model_version`, "1" when it names none

    @property
    def classes(self) -> int:
        return self.spec.classes

    @property
    def outputs(self) -> list[str]:
        """The response's output names, in order: one per member, then `ensemble`."""
        return [*self.members, "ensemble"]

    def decoder(self) -> Decoder:
        return Decoder(self.members, self.coded, self.coeffs, self.resolutions - 1)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "coinserve",
            "inputs": [self.spec.input.metadata()],
            "outputs": [{"name": m, "datatype": "FP32", "shape": [-1, self.classes]} for m in self.outputs],
            "parameters": {
                "members": self.members,
                "coded_replicas": [{"name": n, "row": r} for n, r in self.coded.items()],
                "coefficients": None if self.coeffs is None else self.coeffs.tolist(),
                "resolutions": [{"index": i, "planes": p} for i, p in enumerate(self.planes)],
                "classes": self.classes,
                "labels": list(self.spec.labels),
                # [low, high] every input value must lie in (None: unchecked); a value outside is a 400
                "input_range": None if self.spec.input.range is None else list(self.spec.input.range),
            },
        }


def served_coded_method(manifest: dict[str, Any], requested: str | None) -> str:
    """Which coded models of the bundle protect the members: the one asked for, else the bundle's
    own (the only method it has coded models of; 'none' when it has none)."""
    if requested is not None:
        return requested
    methods = sorted({str(e.get("method")) for e in manifest.get("coded", [])})
    if not methods:
        return "none"
    if len(methods) > 1:
        raise GroupConfigError(
            f"the bundle has coded models of several methods {methods}: choose one with --coded-method"
        )
    return methods[0]


def load_group(settings: GatewaySettings) -> Group:
    path = Path(settings.bundle) / "manifest.json"
    try:
        manifest_bytes = path.read_bytes()
        manifest = json.loads(manifest_bytes)
    except (OSError, json.JSONDecodeError) as exc:
        raise GroupConfigError(f"cannot read the bundle manifest {path}: {exc}") from exc
    try:
        spec = model_spec(manifest)
    except SpecError as exc:
        raise GroupConfigError(f"bundle manifest {path}: {exc}") from exc
    members = [m["name"] for m in manifest["members"]]
    coded_entries = sorted(
        (
            e
            for e in manifest.get("coded", [])
            if e.get("method") == served_coded_method(manifest, settings.coded_method)
        ),
        key=lambda e: e["row"],
    )
    coded = {e["name"]: int(e["row"]) for e in coded_entries if e["name"] in settings.replicas}
    coeffs = np.array([e["coefficients"] for e in coded_entries]) if coded_entries else None
    missing = [m for m in members if m not in settings.replicas]
    if missing:
        raise GroupConfigError(f"no replica URL for members {missing}; give --replica NAME=URL for each")
    for url in [*settings.replicas.values(), *([settings.hedge_replica] if settings.hedge_replica else [])]:
        try:
            parse_address(url)
        except ValueError as exc:
            raise GroupConfigError(str(exc)) from None
    planes = list(manifest.get("refinement", {}).get("planes", [4]))
    return Group(
        name=settings.group or spec.group,
        members=members,
        coded=coded,
        coeffs=coeffs,
        resolutions=len(planes) + 1,
        planes=[*planes, None],
        spec=spec,
        urls={name: url.rstrip("/") for name, url in settings.replicas.items() if name in [*members, *coded]},
        hedge_url=settings.hedge_replica.rstrip("/") if settings.hedge_replica else None,
        hedge_quantile=settings.hedge_quantile,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        version=str(manifest.get("model_version", "1")),
    )


def parse_address(text: str) -> tuple[str, int]:
    """A replica address `tcp://HOST:PORT` → (host, port); ValueError naming the form otherwise."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(
            f"replica address {text!r} must be tcp://HOST:PORT, the worker's channel port (its HTTP port "
            "serves health and metrics only)"
        )
    return parts.hostname, port
