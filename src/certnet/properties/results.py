"""VNN-COMP result and instance files (VNN-COMP rules document: the result file's first line is
``unsat`` / ``sat`` / ``unknown`` / ``timeout`` / ``error``; a ``sat`` result goes on with the
witness ``((X_0 v) (X_1 v) ... (Y_0 v) ...)``; ``instances.csv`` rows are
``onnx,vnnlib,timeout_s`` with paths relative to the csv's folder)."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from certnet.errors import InputError, PropertyError
from certnet.files import atomic_write

from .sexpr import Source, decode, read_sexprs

#: the answers a result file may give
STATUSES = ("unsat", "sat", "unknown", "timeout", "error")
#: largest result or instances file read
MAX_BYTES = 200 * 2**20

_FLOAT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_VAR = re.compile(r"([XY])_(0|[1-9][0-9]{0,8})\Z")


@dataclass(frozen=True)
class Result:
    """A result file: the status and, for ``sat``, the witness values."""

    status: str
    x: tuple[float, ...] | None = None
    y: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Instance:
    """One ``instances.csv`` row (paths resolved against the csv's folder; not checked)."""

    onnx: Path
    vnnlib: Path
    timeout_s: float


def _values(v: torch.Tensor | Sequence[float], name: str) -> list[float]:
    if isinstance(v, torch.Tensor):
        values = v.detach().to("cpu", torch.float64).reshape(-1).tolist()
    else:
        values = [float(e) for e in v]
    if not values or not all(math.isfinite(e) for e in values):
        raise InputError(f"the witness {name} must be non-empty and finite")
    return values


def format_result(status: str, x: torch.Tensor | Sequence[float] | None = None,
                  y: torch.Tensor | Sequence[float] | None = None) -> str:
    """The text of a result file; values as ``repr`` of float64 (they read back exactly)."""
    if status not in STATUSES:
        raise InputError(f"unknown result status {status!r} (one of {', '.join(STATUSES)})")
    if status != "sat":
        if x is not None or y is not None:
            raise InputError(f"a {status!r} result carries no witness")
        return f"{status}\n"
    if x is None or y is None:
        raise InputError("a 'sat' result needs the witness x and y")
    pairs = [f"(X_{i} {v!r})" for i, v in enumerate(_values(x, "x"))]
    pairs += [f"(Y_{j} {v!r})" for j, v in enumerate(_values(y, "y"))]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def write_result(path: str | os.PathLike, status: str,
                 x: torch.Tensor | Sequence[float] | None = None,
                 y: torch.Tensor | Sequence[float] | None = None) -> None:
    """Write a VNN-COMP result file atomically (temporary file + ``os.replace``)."""
    atomic_write(path, format_result(status, x, y))


def _read(path: str | os.PathLike) -> Source:
    name = os.fspath(path)
    try:
        if os.stat(name).st_size > MAX_BYTES:
            raise PropertyError(f"{name}: over the limit of {MAX_BYTES} bytes")
        return decode(Path(name).read_bytes(), name)
    except OSError as e:
        raise PropertyError(f"{name}: cannot read: {e.strerror or e}") from None


def read_result(path: str | os.PathLike) -> Result:
    """A result file written by :func:`write_result` (or any VNN-COMP tool)."""
    src = _read(path)
    nodes = read_sexprs(src)
    if not nodes or isinstance(nodes[0], list) or nodes[0][1] not in STATUSES:
        raise src.error(nodes[0][0] if nodes else 0,
                        f"expected a status first ({', '.join(STATUSES)})")
    status = nodes[0][1]
    if status != "sat":
        if len(nodes) > 1:
            raise src.error(nodes[1][0], f"unexpected text after {status!r}")
        return Result(status)
    if len(nodes) != 2 or not isinstance(nodes[1], list):
        raise src.error(nodes[-1][0], "'sat' must be followed by one witness ((X_0 v) ...)")
    values: dict[tuple[str, int], float] = {}
    for pair in nodes[1][1:]:
        if (not isinstance(pair, list) or len(pair) != 3 or isinstance(pair[1], list)
                or isinstance(pair[2], list)):
            raise src.error(pair[0], "expected a pair (NAME value)")
        m = _VAR.match(pair[1][1])
        if not m:
            raise src.error(pair[1][0], f"{pair[1][1]!r} is not X_i or Y_i")
        key = (m.group(1), int(m.group(2)))
        if key in values:
            raise src.error(pair[1][0], f"{pair[1][1]} given twice")
        if not _FLOAT.match(pair[2][1]):
            raise src.error(pair[2][0], f"{pair[2][1]!r} is not a finite number")
        values[key] = float(pair[2][1])
        if not math.isfinite(values[key]):
            raise src.error(pair[2][0], f"{pair[2][1]} overflows float64")
    out = []
    for letter in "XY":
        n = sum(1 for k in values if k[0] == letter)
        if n == 0 or any((letter, i) not in values for i in range(n)):
            raise src.error(nodes[1][0], f"the witness must give {letter}_0 .. {letter}_n-1")
        out.append(tuple(values[(letter, i)] for i in range(n)))
    return Result("sat", out[0], out[1])


def read_instances(csv_path: str | os.PathLike) -> list[Instance]:
    """The rows of a VNN-COMP ``instances.csv``; blank lines are skipped."""
    src = _read(csv_path)
    folder = Path(os.fspath(csv_path)).parent
    try:
        table = list(csv.reader(src.text.splitlines()))
    except csv.Error as e:
        raise PropertyError(f"{src.name}: not a csv file: {e}") from None
    rows = []
    for line, row in enumerate(table, start=1):
        if not any(f.strip() for f in row):
            continue
        where = f"{src.name}:{line}:1"
        if len(row) != 3:
            raise PropertyError(f"{where}: expected 3 fields onnx,vnnlib,timeout_s, got "
                                f"{len(row)}")
        onnx, vnnlib, timeout = (f.strip() for f in row)
        if not onnx or not vnnlib:
            raise PropertyError(f"{where}: an empty path")
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise PropertyError(f"{where}: timeout {timeout!r} is not a number") from None
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise PropertyError(f"{where}: timeout {timeout!r} must be positive and finite")
        rows.append(Instance(folder / onnx, folder / vnnlib, timeout_s))
    if not rows:
        raise PropertyError(f"{src.name}: no instances")
    return rows
