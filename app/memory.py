"""Give freed heap memory back to the kernel now and then (glibc's `malloc_trim`).

A burst of requests (a replica restart, a straggler storm) briefly holds thousands of request
bodies and replies; glibc keeps the freed heap pages, so the gateway's resident memory would stay
at the burst's high-water mark for good. Trimming every few seconds costs well under a millisecond.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

from models.libc import libc

logger = logging.getLogger(__name__)


def malloc_trim() -> Callable[[], int] | None:
    """`malloc_trim(0)` of the C library, or None where there is none (not glibc)."""
    c = libc()
    if c is None or not hasattr(c, "malloc_trim"):
        return None
    trim = c.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


async def trim_periodically(interval_s: float) -> None:
    trim = malloc_trim()
    if trim is None:
        logger.info("malloc_trim is not available: freed memory stays with the process")
        return
    while True:
        await asyncio.sleep(interval_s)
        trim()
