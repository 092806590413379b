"""Process-wide settings for the commands that run the model on a CPU.

A refiner batch allocates and frees activations of hundreds of MB (about 60 MB per person for a
ResNet-50 at 384×288). glibc's malloc serves each such block with a fresh mmap and hands it back to
the kernel on free, so the next batch pays the first-touch page faults of every page again: on a
CPU that is up to half of a batch's time, spent in the kernel. ``keep_freed_memory`` makes malloc
keep freed memory for reuse instead: large blocks come from the heap, which is not trimmed.

That pays where the model calls repeat one shape, as ``posefix refine`` and ``posefix train`` make
them (every call a full batch): the same blocks are reused and the resident size stays at the first
batch's peak. Where calls take every size (a server's dynamic batches), the untrimmed heap fragments
and grows batch after batch, so ``posefix serve`` leaves malloc as it is. Elsewhere than glibc it does
nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc not to return freed memory to the kernel; True where it took effect."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # No mmap'ed blocks (served from the heap instead), and a trim threshold of 2 GiB - 1 (the largest).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
