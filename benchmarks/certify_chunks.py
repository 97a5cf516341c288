"""Float64 certification in cache-sized chunks against one pass per certify call, side by side:
for each run, the seconds to certify its test points with
``certnet.nn.conv_algorithms.GEMM_CHUNK_ELEMENTS`` at each budget given (``--budgets``, powers
of two; "off" is one pass over each ``--batch-size`` points, as before chunking), alternating
budgets ``--repeats`` times and keeping each one's fastest, and whether every budget gave the
same certificates (prediction, certified, radius) as the one pass. Freed memory is kept for
reuse as the ``certnet`` command keeps it (``certnet.memory``), unless ``--default-allocator``
(a library user's process, which has glibc's defaults).

Writes ``benchmarks/results/certify_chunks.json`` and prints a markdown table.

    python benchmarks/certify_chunks.py --runs models/gloro-mnist-0.3-2c2f \\
        models/gloro-mnist-1.58-4c3f models/ibp-mnist-0.3-dm-medium-cpu-gowal-100 --limit 2000
    python benchmarks/certify_chunks.py ... --default-allocator \\
        --out benchmarks/results/certify_chunks_default_allocator.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from local_lipschitz import load_run
from machine import certnet_commit, cpu_model

from certnet.certify import evaluate
from certnet.checkpoint import write_json
from certnet.memory import keep_freed_memory
from certnet.nn import conv_algorithms

RESULTS = Path(__file__).parent / "results" / "certify_chunks.json"
OFF = 2**62


def certify(run: Path, limit: int | None, budgets: list[int], repeats: int,
            batch_size: int) -> dict:
    model, data, eps = load_run(run, limit)
    _, warm, _ = load_run(run, 8)
    evaluate(model, warm, eps)  # the float64 copy and its constants out of the timings
    seconds: dict[int, float] = {}
    reports = {}
    for _ in range(repeats):
        for budget in budgets:
            conv_algorithms.GEMM_CHUNK_ELEMENTS = budget
            start = time.perf_counter()
            reports[budget] = evaluate(model, data, eps, batch_size=batch_size)
            seconds[budget] = min(seconds.get(budget, float("inf")),
                                  time.perf_counter() - start)
    one = reports[OFF]
    row = {"run": run.name, "eps": eps, "n": len(data), "vra": one.vra, "budgets": {}}
    for budget in budgets:
        r = reports[budget]
        same = (torch.equal(r.pred, one.pred) and torch.equal(r.certified, one.certified)
                and torch.equal(r.radius, one.radius))
        row["budgets"][_name(budget)] = {
            "seconds_per_10k": seconds[budget] * 10_000 / len(data),
            "speed-up": seconds[OFF] / seconds[budget], "same_certificates": same}
        print(f"{run.name}: budget {_name(budget)}: {seconds[budget]:.2f} s, "
              f"{seconds[OFF] / seconds[budget]:.2f}x, same certificates: {same}", flush=True)
    return row


def _name(budget: int) -> str:
    return "off" if budget == OFF else f"2^{budget.bit_length() - 1}"


def table(rows: list[dict]) -> str:
    names = list(rows[0]["budgets"])
    lines = ["| run | points | " + " | ".join(f"{n}: s/10k (speed-up)" for n in names)
             + " | same certificates |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = [f"{b['seconds_per_10k']:.2f} ({b['speed-up']:.2f}x)"
                 for b in r["budgets"].values()]
        same = all(b["same_certificates"] for b in r["budgets"].values())
        lines.append(f"| {r['run']} | {r['n']} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--limit", type=int, help="certify the first N test points only")
    parser.add_argument("--budgets", type=int, nargs="+", default=[19, 20, 21, 22],
                        help="log2 of GEMM_CHUNK_ELEMENTS to compare with one pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2000,
                        help="points per certify call (certnet certify's default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (certnet's CLI default on this 2-core machine)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as a library user's process has it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.default_allocator and keep_freed_memory()
    default = _name(conv_algorithms.GEMM_CHUNK_ELEMENTS)
    budgets = [OFF] + [2**b for b in args.budgets]
    rows = [certify(run, args.limit, budgets, args.repeats, args.batch_size)
            for run in args.runs]
    write_json(args.out, {"runs": rows, "default_budget": default, "keep_freed_memory": kept,
                          "machine": cpu_model(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "commit": certnet_commit(), "command": "python " + " ".join(sys.argv)})
    print(table(rows))


if __name__ == "__main__":
    main()
