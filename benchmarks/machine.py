"""What a benchmark result records about where it ran: the certnet commit and the CPU."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import certnet


def certnet_commit(package: Path | None = None) -> str:
    """The git commit of the certnet source measured (the imported one, or the ``package``
    folder given), with "+changes" if it differs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package or Path(certnet.__file__).parent,
                              capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", ".") else "")


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
