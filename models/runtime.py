"""Process-level settings for torch work: CPU threads and the allocator."""

from __future__ import annotations

import os

import torch

from models.libc import libc

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
    c = libc()
    if c is None:
        return False
    try:
        return bool(c.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and c.mallopt(_M_TRIM_THRESHOLD, 256 << 20))
    except AttributeError:
        return False
