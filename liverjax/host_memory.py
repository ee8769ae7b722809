"""Host memory for XLA:CPU: keep freed buffers for reuse instead of handing them back to the OS.

XLA:CPU mallocs each step's buffers (activations, gradients, im2col patches: hundreds of MB
for the seed CNN at batch 32) and frees them when the step ends. glibc's malloc serves large
blocks, and every block of a thread outside the main arena, with fresh `mmap`s and unmaps
them on free, so every step faults all its buffers in again, one 4 KiB page at a time, and the
kernel zeroes each page. On the 2-core development VM that was 175,000 page faults (715 MB)
per train step, about 0.25 s of a 2.3 s step; the same happens in PyTorch.

`keep_freed_memory()` sets glibc to one arena, no `mmap` for blocks and no trimming (the
`mallopt` settings that MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... set from
the environment): the buffers are faulted in once and then reused (0 faults a step from the
third step on), as PyTorch's CUDA and XLA:GPU's caching allocators do on the device. The
process keeps its peak host memory until it exits. The command-line entry points call it before
JAX starts; LIVERJAX_HOST_MALLOC=system leaves glibc's defaults. It does nothing on other C
libraries (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger("liverjax")

ENV = "LIVERJAX_HOST_MALLOC"  # "reuse" (the default) or "system"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # bytes free at the top of the heap before it shrinks (int max)
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main (brk) heap, which is reused
    (_M_MMAP_MAX, 0),  # no block gets its own mmap, however large
    (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),  # free memory at the top of the heap stays
)
# The same settings for another program, from its environment (glibc reads them at start-up).
GLIBC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
}


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory (see the module docstring); returns whether set.

    Call it before JAX's first computation: threads that already allocated keep their arena.
    """
    choice = os.environ.get(ENV, "reuse")
    if choice not in ("reuse", "system"):
        raise ValueError(f"{ENV}={choice!r}: use 'reuse' (the default) or 'system'")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    failed = [param for param, value in _SETTINGS if libc.mallopt(param, value) != 1]
    if failed:
        logger.warning("glibc mallopt refused parameter(s) %s; host memory is not reused", failed)
        return False
    return True
