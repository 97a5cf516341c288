"""The library's CPU thread count, chosen when certnet is imported (Python API, CLI and tests
alike): OMP_NUM_THREADS if set, else one core fewer than this process may use.

More threads than free cores make torch's OpenMP threads spin in barriers; on the 2-core
reference machine one thread is never more than 1.6x slower than the fastest setting, idle or
beside a busy process, where the other settings lose up to 2.5x (benchmarks/threads.py). Set
OMP_NUM_THREADS, or call ``torch.set_num_threads`` after importing certnet, to override.
"""

from __future__ import annotations

import os
import sys


def default_threads() -> int:
    """One core fewer than this process may use (at least one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) - 1)


def choose_threads() -> None:
    """Apply the default unless OMP_NUM_THREADS is set: through the environment before torch
    loads (its OpenMP runtime reads it once), through torch if it is already loaded."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = default_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
