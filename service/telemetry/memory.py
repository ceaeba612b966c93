"""Keep a long-running process's resident memory flat: glibc malloc settings.

A camera frame is 0.3-6 MB.  glibc serves blocks above its mmap threshold with
``mmap`` and gives them back on ``free``, but it raises that threshold (up to 32 MB)
each time such a block is freed, after which frames come from the heap and its
per-thread arenas, where freed frames leave holes that the OS never gets back: the
process creeps up by a few MB an hour.  :func:`keep_frames_out_of_the_heap` fixes the
threshold below a frame's size, once, at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
FRAME_MMAP_THRESHOLD = 256 * 1024  # below a 320x240 BGR frame (230 kB is under it: kept)


def keep_frames_out_of_the_heap(threshold: int = FRAME_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (True when set).

    Does nothing off Linux/glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set in the
    environment (the operator's choice wins).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
    log.debug("malloc: mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok
