"""Ports a process is about to listen on, checked before anything starts: a port already taken is
one line naming the port and the flag that sets it, never a traceback from deep inside a server."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass


class PortInUseError(OSError):
    """A port this command would listen on is taken (or cannot be opened)."""


@dataclass(frozen=True)
class Listener:
    """One port to check: `what` says whose it is and how it is set, `advice` what to do instead."""

    port: int
    what: str
    advice: str = "choose another"


def check_free(host: str, listeners: Iterable[Listener]) -> None:
    """Raise PortInUseError for the first listener whose port cannot be bound on `host` (port 0: off)."""
    for listener in listeners:
        if listener.port:
            _check_one(host, listener)


def _check_one(host: str, listener: Listener) -> None:
    family = socket.getaddrinfo(host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC bind: TIME_WAIT is no clash
        try:
            probe.bind((host, listener.port))
        except OSError as exc:
            how = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror})"
            raise PortInUseError(f"port {listener.port} ({listener.what}) {how}: {listener.advice}") from None
