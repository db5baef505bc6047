"""Run an ASGI app with uvicorn and a Kubernetes-friendly graceful drain.

On the first SIGTERM/SIGINT the process keeps serving but `on_drain()` makes readiness fail, so the
load balancer stops sending new work; after `drain_delay_s` uvicorn stops accepting connections
and waits (at most `graceful_s`) for in-flight requests and open streams to end with their final
event. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_delay_s: float, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_delay_s = drain_delay_s
        self.on_drain = on_drain
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.drain_delay_s <= 0:
            if self.draining:
                self.force_exit = True
            self.on_drain()
            super().handle_exit(sig, frame)
            return
        self.draining = True
        self.on_drain()
        logger.warning("signal %s: readiness now fails; draining for %.1f s before closing", sig, self.drain_delay_s)
        loop = asyncio.get_event_loop()
        # from a signal handler: wake the loop through its self-pipe rather than touch its timers directly
        loop.call_soon_threadsafe(loop.call_later, self.drain_delay_s, super().handle_exit, sig, frame)


def serve(
    app: Any,
    host: str,
    port: int,
    log_level: str,
    graceful_s: float,
    drain_delay_s: float,
    on_drain: Callable[[], None],
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # the gateway logs the peer it sees; X-Forwarded-For is a proxy's business
        timeout_graceful_shutdown=int(graceful_s),
        timeout_keep_alive=75,  # keep the gateway's pooled connections; uvicorn's default is 5 s
    )
    server = DrainingServer(config, drain_delay_s, on_drain)
    server.run()
