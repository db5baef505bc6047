"""Client requests → (images, Options, id), or a BadRequestError naming the field (DESIGN §3)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import BadRequestError
from app.fanout import Options
from app.group import Group
from app.settings import GatewaySettings
from workers.protocol import ProtocolError, parse_request

PARAMETERS = ("deadline_ms", "min_resolution", "stop_margin", "members")


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
    return Options(deadline, min_resolution, margin, members, stream)


def parse(body: bytes, group: Group, settings: GatewaySettings, stream: bool) -> tuple[np.ndarray, Options, str | None]:
    try:
        images, parameters, request_id = parse_request(body, None, settings.max_batch, PARAMETERS)
    except ProtocolError as exc:
        raise BadRequestError(str(exc)) from exc
    return images, options_from(parameters, group, settings, stream), request_id
