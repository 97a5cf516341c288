"""Wall seconds per phase of a command (data, training steps, evaluation, ...), written to
results.json so that ``benchmarks/whole_job.py`` can split a job's time without profiling it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """Accumulates wall seconds per named phase; ``total`` counts from construction."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def to_dict(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.started}
