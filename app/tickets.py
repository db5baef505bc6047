"""Tickets: a capability in a detached request's `events_url` that stands in for the bearer token on
`GET /v1/requests/{id}[/events]`, for that request only (issue 28), because a browser `EventSource`
cannot send an `Authorization` header.

A ticket is `EXPIRY.TAG.MAC` (URL-safe): EXPIRY the Unix second it stops working, TAG the first 16
bytes of SHA-256(request id), MAC the HMAC-SHA256 of `EXPIRY.TAG` under the ticket key. The key is
HMAC-SHA256(auth token, a fixed label): every gateway that accepts the same bearer token (the
gateways behind one Service, sharing one Redis store) accepts the same tickets, with nothing new to
set up or share; rotating the token revokes every ticket. The check names what is wrong (forged,
another request's, expired) and compares in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

LABEL = b"coinserve /v1/requests events ticket v1"
_TAG_BYTES = 16


class TicketError(Exception):
    """A ticket that does not admit this request; the message says why."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def tag_of(request_id: str) -> str:
    return _b64(hashlib.sha256(request_id.encode(errors="surrogatepass")).digest()[:_TAG_BYTES])


class Tickets:
    """Issues and checks tickets under one key (`from_token` derives it from the bearer token)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_token(cls, token: str) -> Tickets:
        return cls(hmac.new(token.encode(), LABEL, hashlib.sha256).digest())

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._key, signed.encode(errors="surrogatepass"), hashlib.sha256).digest())

    def issue(self, request_id: str, expires_at_s: float) -> str:
        """A ticket for `request_id` that works until the Unix time `expires_at_s`."""
        signed = f"{int(expires_at_s)}.{tag_of(request_id)}"
        return f"{signed}.{self._mac(signed)}"

    def check(self, request_id: str, ticket: str, now_s: float) -> None:
        """Raises TicketError unless `ticket` was issued under this key for `request_id` and has not expired."""
        parts = ticket.split(".")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit() and len(parts[0]) <= 12):
            raise TicketError("malformed ticket: expected EXPIRY.TAG.MAC as events_url gives it")
        expiry, tag, mac = parts
        # compared as text: one spelling per MAC (base64 has several for the same bytes)
        expected = self._mac(f"{expiry}.{tag}")
        if not hmac.compare_digest(mac.encode(errors="surrogatepass"), expected.encode()):
            raise TicketError("invalid ticket: this gateway did not issue it (or its auth token changed since)")
        if not hmac.compare_digest(tag.encode(), tag_of(request_id).encode()):
            raise TicketError(f"ticket is for another request, not {request_id!r}")
        if int(expiry) <= now_s:
            raise TicketError("ticket expired (tickets last as long as the request's retention)")
