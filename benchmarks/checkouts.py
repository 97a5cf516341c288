"""Run certnet from two checkouts side by side: a temporary ``git worktree`` of a commit, the
``certnet`` command (or a script) in a subprocess with one checkout's ``src`` first on
PYTHONPATH and this virtual environment, and what the library says about a model there.

The benchmarks that compare checkouts import none of the trees they measure in their own
process (one may be mid-edit; ``machine.py``'s ``import certnet`` loads only the lazy package),
hence the small JSON writer here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from machine import certnet_commit

ROOT = Path(__file__).resolve().parents[1]

#: Printed as JSON by a subprocess in a checkout: each model's default certifier, norm, whether
#: it has convolutions, and the certifiers that apply to it in that norm (cheapest first, then
#: ``best`` if it applies), or why it cannot be loaded; and each certifier's relative cost.
_DESCRIBE = """
import json, sys
import certnet
from certnet.certifiers import CERTIFIERS, applicable
from certnet.checkpoint import load
models = {}
for d in sys.argv[1:]:
    try:
        m = load(d, device="cpu")
    except Exception as err:
        models[d] = {"error": f"{type(err).__name__}: {err}"}
        continue
    names = applicable(m, m.norm)
    if "best" in CERTIFIERS and CERTIFIERS["best"].applies(m, m.norm) is None:
        names.append("best")
    layers = [spec["type"] for spec in m.checkpoint_config.get("layers", [])]
    models[d] = {"default": m.default_certifier, "norm": m.norm, "certifiers": names,
                 "conv": any("conv" in t for t in layers)}
print(json.dumps({"certnet": certnet.__file__, "models": models,
                  "costs": {k: c.cost for k, c in CERTIFIERS.items()}}))
"""


class Process(NamedTuple):
    seconds: float  # wall seconds, measured here
    peak_mib: float  # the process's own peak resident memory
    stdout: str


def run_python(src: Path, argv: list[str], env: dict[str, str] | None = None) -> Process:
    """Run ``python ARGV`` with ``src`` first on the path (and ``env`` added); output goes to
    files, so a chatty process cannot block on a full pipe. Raises RuntimeError on failure."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(src)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            shown = " ".join(a if len(a) < 100 else a[:20] + "..." for a in argv[:4])
            tail = err.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{shown} ... failed (exit {process.returncode}):\n{tail}")
        return Process(wall, usage.ru_maxrss / 1024, out.read().decode(errors="replace"))


def run_certnet(src: Path, args: list[str], env: dict[str, str] | None = None) -> Process:
    """Run ``certnet ARGS`` from the checkout whose source folder is ``src``."""
    return run_python(src, ["-m", "certnet.cli", *args], env)


def certify(src: Path, run: Path, certifier: str | None = None, limit: int | None = None,
            env: dict[str, str] | None = None, per_point: Path | None = None) -> dict[str, Any]:
    """``certnet certify RUN`` on the CPU from ``src``: its ``--json`` payload, with the
    process's wall seconds and peak MiB added (``process_seconds``, ``peak_mib``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "certify.json"
        args = ["certify", str(run), "--device", "cpu", "--json", str(out)]
        args += ["--certifier", certifier] if certifier else []
        args += ["--limit", str(limit)] if limit else []
        args += ["--per-point", str(per_point)] if per_point else []
        process = run_certnet(src, args, env)
        result = json.loads(out.read_text())
    return {**result, "process_seconds": process.seconds, "peak_mib": process.peak_mib}


def describe(src: Path, runs: list[Path]) -> dict[str, Any]:
    """What the library in ``src`` says about each run (see ``_DESCRIBE``), keyed by path;
    exits if that checkout's certifiers cannot be imported (a tree mid-edit: compare two
    commits instead)."""
    try:
        process = run_python(src, ["-c", _DESCRIBE, *map(str, runs)])
    except RuntimeError as err:
        raise SystemExit(f"certnet from {src} cannot describe the runs (measure a commit "
                         f"with --current REV instead?): {err}") from None
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if not Path(result["certnet"]).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"certnet imported from {result['certnet']}, not from {src}")
    return result


def commit(rev: str) -> str:
    """The full hash of ``rev`` in this repository."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"unknown commit {rev!r}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary detached ``git worktree`` of ``rev`` (its root), removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / f"certnet-{rev}"
        done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                               str(where), rev], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"git worktree add {rev} failed: {done.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(where)], check=False, capture_output=True)


@contextmanager
def checkouts(baseline: str, current: str | None = None) -> Iterator[dict[str, Path]]:
    """The roots of the ``baseline`` commit and of the current side (this working tree, or the
    commit ``current``), as {"baseline": root, "current": root}; worktrees removed on exit."""
    with ExitStack() as stack:
        yield {"baseline": stack.enter_context(worktree(baseline)),
               "current": stack.enter_context(worktree(current)) if current else ROOT}


def state(root: Path) -> dict[str, str]:
    """The commit of a checkout's certnet source ("+changes" if edited) and a hash of its
    uncommitted changes to src/ (the same hash: the same tree), for results files."""
    changes = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--", "src"],
                             capture_output=True).stdout
    changes += subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                              capture_output=True).stdout
    return {"commit": certnet_commit(root / "src" / "certnet"),
            "src_changes_sha1": hashlib.sha1(changes).hexdigest()[:12] if changes else ""}


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that gives a certnet process ``threads`` torch and numba threads (None:
    the CLI's own default, one fewer than the cores available)."""
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads),
                                       "NUMBA_NUM_THREADS": str(threads)}


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to a temporary file, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
