"""Process-level settings for torch work: CPU threads and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def use_all_cores(threads: int | None = None) -> int:
    """Give torch every core we may use (both on the 2-core reference machine), or `threads`."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Stop glibc from returning multi-megabyte activations to the kernel after every forward pass.

    By default each large tensor is mmap'ed and unmapped again, so every pass pays page faults:
    measured on the default CNN at batch 64, the first convolution took 4.8 ms instead of 0.5 ms.
    Returns False where mallopt is unavailable (non-glibc), which only costs speed.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):
        return False
