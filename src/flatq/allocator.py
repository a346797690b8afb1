"""Keep freed host memory in the process, so that CPU training stops paying page faults.

PyTorch's CPU allocator is plain malloc. glibc serves every block above its mmap threshold
(which its dynamic rule caps at 32 MiB) with fresh pages from mmap and unmaps them on free.
Activations at training batch sizes are larger than that, so each step touches gigabytes of
new pages and the kernel zero-fills every one on first touch: on a ResNet-18 step at batch 256
(2 CPU threads) about a quarter of the CPU time went to these page faults, and more of it the
more a method allocates (FPQ's teacher forward and CSD). With large blocks served from the heap
and freed memory kept there, the next step reuses the same pages (docs/speed.md has the
measurements). The price: the process keeps its peak heap instead of returning it to the OS
between steps, which a training process reaches again every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest block still served from the heap, and the free memory at
# the top of the heap that glibc keeps instead of trimming.
LARGEST_HEAP_BLOCK = 2**31 - 1
KEPT_FREE_MEMORY = 2**31 - 1

# Setting any of these means the user tuned malloc; flatq then leaves it alone.
USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                        "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def retain_freed_host_memory() -> bool:
    """Have glibc malloc serve large blocks from its heap and keep freed memory for reuse.

    Process-wide and affects only later allocations; the `flatq` command calls it at start.
    Returns whether it applied: not on other C libraries (macOS, Windows, musl), and not when
    the environment sets glibc's own malloc variables (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``
    restores glibc's default behaviour for one run).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_MALLOC_SETTINGS):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
                and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_MEMORY))
