"""The one request path through the gateway (DESIGN §2), whatever the surface: authorise, check
the model, admit, parse, check the deadline, start the request's owned run, and give the admission
back if any of that fails. REST (JSON, binary, SSE: app/hotpath.py), `/v1/requests`
(app/routes/requests.py) and gRPC (app/rpc.py) each only translate their own types into these
calls and the outcome back, as KServe's surfaces call its `DataPlane`.

Failures are `CoinserveError`s (app/errors.py) carrying the HTTP status; gRPC maps the status to
its own codes.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from app.admission import Admission, Slot
from app.errors import (
    BadRequestError,
    NotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
    UnavailableError,
)
from app.eventlog import EventLog, LogStore, MemoryLog
from app.group import Group
from app.lifecycle import Admitted, Lifecycle, Owned
from app.redis_store import StoreUnavailableError
from app.responses import is_default
from app.settings import GatewaySettings
from app.tickets import TicketError, Tickets
from app.validation import parse_request
from protocol.v2 import InferRequest

# A /v1 request id travels in URLs, headers and store keys: URL-safe, at most 128 characters, and
# starting with a letter or digit (so never `.` or `..` as a path segment).
_DETACHED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}")


@dataclass(frozen=True)
class Started:
    """A request that is running: what it asked for, its owned run, and the stream slot its surface
    holds while it streams (None for a single answer)."""

    request: InferRequest
    owned: Owned
    stream_slot: Slot | None


class DataPlane:
    def __init__(
        self, settings: GatewaySettings, group: Group, admission: Admission, lifecycle: Lifecycle, store: LogStore
    ) -> None:
        self.settings, self.group = settings, group
        self.admission, self.lifecycle, self.store = admission, lifecycle, store
        token = settings.auth_token
        self._expected = f"Bearer {token.get_secret_value()}".encode() if token is not None else None
        self.tickets = Tickets.from_token(token.get_secret_value()) if token is not None else None
        # A ticket outlives the longest run plus the retention of its log: it works as long as the log does.
        run_s = max(settings.max_deadline_ms / 1000, settings.upstream_timeout_s)
        self.ticket_s = run_s + settings.retention_s

    def authorise(self, authorization: str | bytes | None) -> None:
        """The bearer token, when one is configured; constant-time, no detail in the error."""
        if self._expected is None:
            return
        given = authorization or b""
        if isinstance(given, str):
            given = given.encode(errors="surrogateescape")
        if not hmac.compare_digest(given, self._expected):
            raise UnauthorizedError("unauthorized", headers={"WWW-Authenticate": "Bearer"})

    def ticket_for(self, request_id: str) -> str | None:
        """The ticket `events_url` carries; None on a gateway without a bearer token (nothing to stand in for)."""
        return None if self.tickets is None else self.tickets.issue(request_id, time.time() + self.ticket_s)

    def authorise_follow(self, authorization: str | None, request_id: str, ticket: str | None) -> None:
        """Following or polling a detached request: the bearer token, or a ticket for this request.
        A ticket that does not admit it is refused with the reason (a browser cannot say more)."""
        if self.tickets is None or ticket is None:
            self.authorise(authorization)
            return
        if authorization:
            try:
                self.authorise(authorization)
                return
            except UnauthorizedError:
                pass  # the ticket may still admit it
        try:
            self.tickets.check(request_id, ticket, time.time())
        except TicketError as exc:
            raise UnauthorizedError(str(exc), headers={"WWW-Authenticate": "Bearer"}) from None

    def check_model(self, name: str, version: str | None) -> None:
        group = self.group
        if name != group.name:
            raise NotFoundError(f"no model group {name!r}; this gateway serves {group.name!r}")
        if version is not None and version not in ("", group.version):
            raise NotFoundError(
                f"no version {version!r} of model group {group.name!r}; its version is {group.version!r}"
            )

    def check_named_model(self, parsed: InferRequest, served: str) -> None:
        """A body that names its model (KServe's clients send `model_name` and `model_version`) must
        name the one `served` names (the route's, already checked by `check_model`, or the group's)."""
        group = self.group
        if parsed.model_name is not None and parsed.model_name != group.name:
            raise BadRequestError(f"the body's model_name {parsed.model_name!r} does not match {served} {group.name!r}")
        if parsed.model_version is not None and parsed.model_version != group.version:
            raise BadRequestError(
                f"the body's model_version {parsed.model_version!r} does not match {served}'s version {group.version!r}"
            )

    def admit(self, stream: bool) -> tuple[Slot, Slot | None]:
        """A request slot (and a stream slot), taken before the body is read: a burst cannot slip past
        the limits while bodies are read."""
        slot = self.admission.request()
        try:
            return slot, self.admission.stream() if stream else None
        except BaseException:
            slot.release()
            raise

    def start(
        self,
        slots: tuple[Slot, Slot | None],
        body: bytes,
        header_length: int | None,
        arrival: float,
        endpoint: str,
        deadline: Callable[[float | None], float | None] | None = None,
    ) -> Started:
        """Parse, check and start a request under the slots `admit` gave; they are given back if
        anything fails (the request slot otherwise goes back with the terminal event)."""
        slot, stream_slot = slots
        stream = stream_slot is not None
        try:
            parsed, options = parse_request(body, header_length, self.group, self.settings, stream)
            self.check_named_model(parsed, "the route's model")
            if stream and (parsed.binary_output or any(o.binary for o in parsed.outputs or ())):
                raise BadRequestError("binary outputs cannot travel in an event stream; ask for JSON outputs")
            if deadline is not None:
                options = replace(options, deadline_ms=deadline(options.deadline_ms))
            self.admission.check_deadline(options.deadline_ms, options.members, arrival)
        except BaseException:
            slot.release()
            if stream_slot is not None:
                stream_slot.release()
            self.lifecycle.statistics.failed(arrival)  # admitted, then refused: Triton counts a failure
            raise
        admitted = Admitted(parsed.images, options, arrival, parsed.request_id, endpoint, slot)
        return Started(parsed, self.lifecycle.start(MemoryLog(), admitted), stream_slot)

    async def start_detached(self, body: bytes, arrival: float, header_id: str | None = None) -> str:
        """`POST /v1/requests`: a request whose log lives in the store (any gateway may follow it); →
        its id: the body's `id`, else `header_id` (X-Request-ID), else a fresh one. Both given must agree."""
        slot, _ = self.admit(stream=False)  # held until the request's terminal event
        try:
            parsed, options = parse_request(body, None, self.group, self.settings, stream=True)
            self.check_named_model(parsed, "the served model group")
            if not is_default(parsed):
                raise BadRequestError(
                    "outputs and binary_data_output belong to /v2/.../infer; /v1 streams every output"
                )
            self.admission.check_deadline(options.deadline_ms, options.members, arrival)
            request_id = _detached_id(parsed.request_id, header_id)
            log = await self._create_log(request_id)
        except BaseException:
            slot.release()
            self.lifecycle.statistics.failed(arrival)
            raise
        self.lifecycle.start(log, Admitted(parsed.images, options, arrival, request_id, "requests", slot))
        return request_id

    async def _create_log(self, request_id: str) -> EventLog:
        in_use = BadRequestError(f"id {request_id!r} is already in use; leave id out to get a fresh one")
        try:
            if await self.store.get(request_id) is not None:
                raise in_use
            log = await self.store.create(request_id)
        except KeyError:  # created by another gateway between the two calls
            raise in_use from None
        except StoreUnavailableError as exc:
            raise UnavailableError(f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
        if log is None:
            raise TooManyRequestsError(
                "too many retained requests still running; retry shortly", headers={"Retry-After": "1"}
            )
        return log


def _detached_id(body_id: str | None, header_id: str | None) -> str:
    if body_id is not None and header_id is not None and body_id != header_id:
        raise BadRequestError(
            f"the body's id {body_id!r} and the X-Request-ID header {header_id!r} differ: send one, or the same in both"
        )
    given, where = (body_id, "id") if body_id is not None else (header_id, "X-Request-ID")
    if given is None:
        return uuid.uuid4().hex
    if not _DETACHED_ID.fullmatch(given):
        raise BadRequestError(
            f"{where} {given!r} cannot name a /v1 request: use 1 to 128 of A-Z a-z 0-9 . _ ~ : - "
            "starting with a letter or digit"
        )
    return given
