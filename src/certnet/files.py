"""Files that appear whole or not at all: a temporary file in the same folder, fsync, then
``os.replace`` (and the folder fsynced). Below every writer: checkpoints, reports, curves,
VNN-LIB properties and VNN-COMP result files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: the process's umask (read once: os.umask can only be read by setting it)
UMASK = os.umask(0)
os.umask(UMASK)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (a str as UTF-8) to ``path`` so that readers see the old file or the
    new one, never a mix; missing parent folders are created. On failure (e.g. disk full) the
    previous file is left intact and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
