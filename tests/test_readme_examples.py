"""The README's "Bring your own model" examples run as written: every fenced block after an
``<!-- example: NAME -->`` marker, Python blocks in a fresh interpreter, shell blocks with the
``certnet`` command of this environment, in order, in one temporary working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- example: (\w+) -->\n```(\w+)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str, str]]:
    return BLOCK.findall(README.read_text())


def test_the_readme_marks_its_three_examples():
    assert [name for name, _, _ in examples()] == ["resnet", "export", "onnx"]


def test_the_examples_run(tmp_path, mnist_available):
    pytest.importorskip("onnx")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for name, language, code in examples():
        argv = [sys.executable, "-c", code] if language == "python" else ["bash", "-ec", code]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"example {name} failed:\n{done.stderr[-2000:]}"
        if name == "onnx":
            assert done.stdout.strip().splitlines()[-1] in ("holds", "violated", "unknown")
