"""Client requests → (images, Options, id), or a BadRequestError naming the field (DESIGN §3)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import BadRequestError
from app.group import Group
from app.settings import GatewaySettings
from app.updates import Options
from protocol.v2 import HEADER_LENGTH, InferRequest, ProtocolError, parse_infer

PARAMETERS = ("deadline_ms", "min_resolution", "stop_margin", "members", "coarse")


def _number(parameters: dict[str, Any], name: str) -> float | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequestError(f"parameters.{name} must be a finite number, got {value!r}")
    return float(value)


def options_from(parameters: dict[str, Any], group: Group, settings: GatewaySettings, stream: bool) -> Options:
    deadline = _number(parameters, "deadline_ms")
    if deadline is not None and not 0 < deadline <= settings.max_deadline_ms:
        raise BadRequestError(f"parameters.deadline_ms must be in (0, {settings.max_deadline_ms:g}], got {deadline:g}")
    margin = _number(parameters, "stop_margin")
    if margin is not None and not 0 < margin <= 1:
        raise BadRequestError(f"parameters.stop_margin must be in (0, 1], got {margin:g}")
    min_resolution = parameters.get("min_resolution", 0)
    if type(min_resolution) is not int or not 0 <= min_resolution < group.resolutions:
        raise BadRequestError(
            f"parameters.min_resolution must be an integer in 0..{group.resolutions - 1}, got {min_resolution!r}"
        )
    members = parameters.get("members")
    if members is not None:
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise BadRequestError("parameters.members must be a non-empty list of member names")
        unknown = [m for m in members if m not in group.members]
        if unknown or len(set(members)) != len(members):
            raise BadRequestError(
                f"parameters.members: unknown or repeated names {unknown or members}; members are {group.members}"
            )
        members = [m for m in group.members if m in members]  # code order
    coarse = parameters.get("coarse", False)
    if type(coarse) is not bool:
        raise BadRequestError(f"parameters.coarse must be true or false, got {coarse!r}")
    return Options(deadline, min_resolution, margin, members, stream, coarse)


def header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header of the binary tensor extension, or None."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 12):
        raise BadRequestError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_request(
    body: bytes, length: int | None, group: Group, settings: GatewaySettings, stream: bool
) -> tuple[InferRequest, Options]:
    """The request as the surfaces need it: the parsed tensors and outputs asked for, and its Options."""
    try:
        parsed = parse_infer(body, length, settings.max_batch, PARAMETERS, group.spec.input, group.outputs)
    except ProtocolError as exc:
        raise BadRequestError(str(exc)) from exc
    options = options_from(parsed.parameters, group, settings, stream)
    if options.members is not None and parsed.outputs is not None:
        absent = [o.name for o in parsed.outputs if o.name != "ensemble" and o.name not in options.members]
        if absent:
            raise BadRequestError(f"outputs {absent} are not among parameters.members {options.members}")
    return parsed, options


def parse(body: bytes, group: Group, settings: GatewaySettings, stream: bool) -> tuple[np.ndarray, Options, str | None]:
    parsed, options = parse_request(body, None, group, settings, stream)
    return parsed.images, options, parsed.request_id
