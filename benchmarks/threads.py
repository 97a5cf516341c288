"""Thread settings on a shared CPU: wall time of ``certnet certify``, ``info``, ``attack`` and
two short ``certnet train`` runs under each setting, on an idle machine and while another
process keeps one core busy (a CPU hog), side by side. Writes
``benchmarks/results/threads/threads.json`` (with the certnet commit measured) and prints a
markdown table.

    python benchmarks/threads.py [--model models/gloro-mnist-0.3-2c2f] [--repeats 3]

The settings that import torch before the CLI runs measure torch's own thread defaults (or the
one set), whatever the CLI would set; "certnet CLI default" is what `certnet` does.
Run it on an otherwise idle machine: it refuses to start if the CPU is busy.
``threads-54f5ae4.json`` beside the results holds one run per cell at commit 54f5ae4, before
the sound bounds were rewritten (``--out`` names the file).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import certnet_commit

from certnet.checkpoint import write_json

OUT = Path(__file__).parent / "results" / "threads" / "threads.json"
RUN_CLI = "import sys\nfrom certnet.cli import main\nsys.exit(main(sys.argv[1:]))"
#: label -> (environment variables, Python run before the CLI)
SETTINGS = {
    "torch default": ({}, "import torch\n"),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, "import torch\n"),
    "torch.set_num_threads(1)": ({}, "import torch\ntorch.set_num_threads(1)\n"),
    "certnet CLI default": ({}, ""),
}
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def commands(model: str, out: Path) -> dict[str, list[str]]:
    train = ["train", "--epochs", "1", "--train-limit", "2048", "--eval-limit", "1000",
             "--quiet", "--out", str(out)]
    return {"certify --limit 2000": ["certify", model, "--limit", "2000"],
            "info": ["info", model],
            "attack --limit 500": ["attack", model, "--limit", "500", "--steps", "20",
                                   "--restarts", "2"],
            "train 2c2f": [*train, "--config", "gloro-quickstart-mnist-0.3-2c2f"],
            "train 4c3f": [*train, "--config", "gloro-mnist-1.58-4c3f"]}


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time spent busy over ``seconds`` (Linux)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)




def timed(argv: list[str], env: dict[str, str], timeout: float) -> float:
    """Wall seconds of one run (``timeout`` if it had to be stopped)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return timeout
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{done.stderr}")
    return time.perf_counter() - start


def _cell(runs: list[float], timeout: float) -> dict:
    return {"median_s": statistics.median(runs), "runs_s": runs,
            "timed_out": sum(r >= timeout for r in runs)}


def measure(model: str, repeats: int, timeout: float, scratch: Path) -> dict[str, dict]:
    """Median wall seconds per setting and command under the current machine load."""
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    results: dict[str, dict] = {}
    for label, (extra, prelude) in SETTINGS.items():
        for name, args in commands(model, scratch / "run").items():
            runs = []
            for _ in range(repeats):
                shutil.rmtree(scratch / "run", ignore_errors=True)
                runs.append(timed([sys.executable, "-c", prelude + RUN_CLI, *args],
                                  {**base, **extra}, timeout))
            results.setdefault(label, {})[name] = _cell(runs, timeout)
    results["imports"] = {code: _cell([timed([sys.executable, "-c", code], base, timeout)
                                       for _ in range(repeats)], timeout)
                          for code in ("import certnet.cli", "import torch")}
    return results


def with_hog(function, *args):
    """Run ``function(*args)`` while another process keeps one core busy."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return function(*args)
    finally:
        hog.kill()
        hog.wait()


def table(results: dict[str, dict]) -> str:
    def fmt(cell: dict) -> str:
        return (">" if cell["timed_out"] > len(cell["runs_s"]) // 2 else "") + \
            f"{cell['median_s']:.1f}"

    names = list(results["idle"]["torch default"])
    lines = ["| setting | " + " | ".join(f"{n}: idle / hog (s)" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for label in SETTINGS:
        lines.append(f"| {label} | " + " | ".join(
            f"{fmt(results['idle'][label][n])} / {fmt(results['hog'][label][n])}"
            for n in names) + " |")
    for code in results["idle"]["imports"]:
        idle, hog = (results[load]["imports"][code]["median_s"] for load in ("idle", "hog"))
        lines.append(f"| `python -c \"{code}\"` | {idle:.2f} / {hog:.2f} |"
                     + " |" * (len(names) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/gloro-mnist-0.3-2c2f",
                        help="checkpoint to certify (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per cell; the median is reported (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds after which a run is stopped and counted as that long "
                        "(default: %(default)s)")
    parser.add_argument("--scratch", default="runs/threads-benchmark",
                        help="directory for the training runs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="run even if the CPU is busy")
    parser.add_argument("--out", type=Path, default=OUT, help="results JSON "
                        "(default: benchmarks/results/threads/threads.json)")
    args = parser.parse_args()
    busy = cpu_busy()
    if busy > 0.15 and not args.force:
        raise SystemExit(f"the CPU is {100 * busy:.0f}% busy; run on an idle machine "
                         "(or pass --force)")
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    idle = measure(args.model, args.repeats, args.timeout, scratch)
    hog = with_hog(measure, args.model, args.repeats, args.timeout, scratch)
    shutil.rmtree(scratch / "run", ignore_errors=True)
    results = {"idle": idle, "hog": hog}
    write_json(args.out, {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                          "certnet_commit": certnet_commit(), "torch": torch.__version__,
                          "model": args.model, "repeats": args.repeats,
                          "timeout_s": args.timeout, "cpu_busy_before": busy,
                          "hog": "python -c 'while True: pass' (one process)", **results})
    print(table(results))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
