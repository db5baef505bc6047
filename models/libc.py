"""The C library, for the allocator knobs of models/runtime.py and app/memory.py (no torch here)."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def libc() -> ctypes.CDLL | None:
    """The process's C library, or None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
