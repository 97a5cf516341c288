"""Keep freed memory in the process for reuse (glibc's allocator).

By default glibc maps every allocation above a threshold (32 MB at most) with mmap and unmaps it
on free, so each training step page-faults anew on the bound and activation tensors it
allocates. Measured here, one thread, two alternations of ``benchmarks/bounds_speed.py
--models dm-medium --no-auto-lirpa`` without and with ``--keep-freed-memory`` (batch 256): a
CROWN-IBP training step 2.24-2.36 -> 1.47-1.57 s, IBP bounds 0.089-0.109 -> 0.070-0.076 s, an
IBP step 0.31-0.33 -> 0.29-0.32 s; through the CLI a CROWN-IBP epoch (2000 points) 17% faster
and the float64 certification of 10k MNIST points 1.74 -> 0.89 s (benchmarks/whole_job.py);
GloRo 2C2F steps unchanged. The ``certnet`` command calls :func:`keep_freed_memory` for its
own process; a library user may call it too. Values and results are unchanged; the resident
memory no longer shrinks after a peak.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
#: Environment variable that, set to 0, leaves the allocator's defaults alone.
SWITCH = "CERTNET_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Allocate from the heap only (no per-block mmap), never trim it below 2 GB of free
    space, and grow it 256 MB at a time; True if glibc took the settings (False elsewhere, or
    if ``CERTNET_KEEP_FREED_MEMORY=0``)."""
    if os.environ.get(SWITCH) == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**28)))
