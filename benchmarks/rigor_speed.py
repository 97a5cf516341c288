"""The cost of rigour, side by side in one run: certification time and verified accuracy of the
committed IBP, CROWN-IBP and l_inf-dist runs, and the rows of ``benchmarks/bounds_speed.py``,
for a baseline commit (default d681206, before the floating-point rigour work) and this
working tree (or ``--current COMMIT``).

Each measurement is its own process with one checkout's ``src`` first on PYTHONPATH (the
baseline from a temporary ``git worktree``) and ``--threads`` torch and numba threads (default
1, as the CLI chooses on this 2-core machine). A certify row is ``certnet certify RUN
--certifier C [--limit N]`` (seconds: the report's time inside the certify calls, so start-up
and loading are left out; the process's wall time is kept too), after one untimed 8-point
warm-up per side. The bounds rows come from each checkout's own ``bounds_speed.py``
(``--no-auto-lirpa``, plus ``--bounds-args``), one process per repeat. Baseline and current
alternate (A B A B ..., ``--repeats`` times) and each side's median is reported (``--stat best``:
its fastest). Writes ``benchmarks/results/rigor_speed.json`` after every row and prints a
markdown table (ratio = current s / baseline s).

    python benchmarks/rigor_speed.py --repeats 3
    python benchmarks/rigor_speed.py --runs models/ibp-mnist-0.3-dm-medium-cpu --limit 50 \\
        --repeats 1 --skip-bounds
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from checkouts import ROOT, certify, checkouts, commit, describe, run_python, state, thread_env
from checkouts import write_json as write_atomic
from machine import cpu_model
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results" / "rigor_speed.json"
BASELINE = "d681206"
SIDES = ("baseline", "current")
STATS = {"median": statistics.median, "best": min}


def default_runs() -> list[Path]:
    """Every committed IBP, CROWN-IBP and l_inf-dist run."""
    return sorted(p for pattern in ("ibp-*", "crown-ibp-*", "linf-dist-*")
                  for p in (ROOT / "models").glob(pattern) if p.is_dir())


def certify_row(roots: dict[str, Path], run: Path, certifier: str, args: argparse.Namespace,
                env: dict[str, str], bar: tqdm) -> dict[str, Any]:
    """Alternating timed certifications of one (run, certifier) by both checkouts."""
    row: dict[str, Any] = {"row": f"{run.name} / {certifier}", "kind": "certify",
                           "run": run.name, "certifier": certifier}
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for side in SIDES:  # untimed: numba's cache in a fresh worktree, the page cache
        try:
            certify(roots[side] / "src", run, certifier, 8, env)
        except RuntimeError as err:
            row[f"error_{side}"] = str(err)
        bar.update()
    for _ in range(args.repeats):
        for side in SIDES:
            if f"error_{side}" not in row:
                try:
                    results[side].append(certify(roots[side] / "src", run, certifier,
                                                 args.limit, env))
                except RuntimeError as err:
                    row[f"error_{side}"] = str(err)
            bar.update()
    stat = STATS[args.stat]
    for side, done in results.items():
        if not done:
            continue
        last = done[-1]
        row["n"] = last["n"]
        row[f"seconds_{side}"] = stat([r["seconds"] for r in done])
        row[f"process_seconds_{side}"] = stat([r["process_seconds"] for r in done])
        row[f"peak_mib_{side}"] = max(r["peak_mib"] for r in done)
        row[f"vra_{side}"] = last["vra"]
        row[f"clean_accuracy_{side}"] = last["clean_accuracy"]
        row[f"runs_{side}"] = [r["seconds"] for r in done]
        if len({r["vra"] for r in done}) > 1:
            row[f"vra_runs_{side}"] = [r["vra"] for r in done]  # should never differ
    return with_ratio(row)


def with_ratio(row: dict[str, Any]) -> dict[str, Any]:
    if "seconds_baseline" in row and "seconds_current" in row:
        row["ratio"] = row["seconds_current"] / row["seconds_baseline"]
    return row


def bounds_rows(roots: dict[str, Path], args: argparse.Namespace, env: dict[str, str],
                bar: tqdm) -> list[dict[str, Any]]:
    """``bounds_speed.py`` run from each checkout, alternating, one process per repeat."""
    runs: dict[str, list[list[dict]]] = {side: [] for side in SIDES}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for side in SIDES:
                out = Path(tmp) / f"{side}-{repeat}.json"
                script = roots[side] / "benchmarks" / "bounds_speed.py"
                if side not in failed:
                    try:
                        run_python(roots[side] / "src", [str(script), "--no-auto-lirpa",
                                                         "--out", str(out),
                                                         *shlex.split(args.bounds_args)], env)
                        runs[side].append(json.loads(out.read_text())["rows"])
                    except RuntimeError as err:
                        failed[side] = str(err)
                bar.update()
    stat = STATS[args.stat]
    keys = [(r["model"], r["method"], r["batch"]) for r in (runs["baseline"] or runs["current"]
                                                            or [[]])[0]]
    if not keys:  # neither side ran: one row with the errors
        return [{"row": "bounds_speed", "kind": "bounds",
                 **{f"error_{side}": why for side, why in failed.items()}}]
    rows = []
    for model, method, batch in keys:
        row: dict[str, Any] = {"row": f"bounds_speed {model} {method} (batch {batch})",
                               "kind": "bounds", "model": model, "method": method,
                               "batch": batch}
        for side in SIDES:
            found = [r for rows_ in runs[side] for r in rows_
                     if (r["model"], r["method"], r["batch"]) == (model, method, batch)]
            if side in failed:
                row[f"error_{side}"] = failed[side]
            if found:
                row[f"seconds_{side}"] = stat([r["certnet_s"] for r in found])
                row[f"runs_{side}"] = [r["certnet_s"] for r in found]
                row[f"mean_bound_{side}"] = found[-1]["mean_certnet_bound"]
        rows.append(with_ratio(row))
    return rows


def errors(row: dict[str, Any]) -> str:
    """The last line of each side's error in a row (a traceback's own message), if any."""
    return "".join(f"\n  {side} failed: {row[f'error_{side}'].splitlines()[-1]}"
                   for side in SIDES if f"error_{side}" in row)


def fmt(row: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    """A cell: the value, "error" where that side failed, else "–" (a bounds row's VRA)."""
    if key in row:
        return format(scale * row[key], spec)
    side = key.rsplit("_", 1)[-1]
    failed = f"error_{side}" in row and (row["kind"] == "certify" or key.startswith("seconds"))
    return "error" if failed else "–"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | baseline s | current s | ratio | baseline VRA % | current VRA % |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {fmt(r, 'seconds_baseline', '.3f')} | "
                     f"{fmt(r, 'seconds_current', '.3f')} | "
                     f"{format(r['ratio'], '.2f') if 'ratio' in r else '–'} | "
                     f"{fmt(r, 'vra_baseline', '.2f', 100)} | "
                     f"{fmt(r, 'vra_current', '.2f', 100)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="commit to compare against")
    parser.add_argument("--current", help="a commit to measure instead of this working tree")
    parser.add_argument("--runs", type=Path, nargs="+",
                        help="checkpoint directories (default: models/ibp-*, models/crown-ibp-*, "
                             "models/linf-dist-*)")
    parser.add_argument("--certifiers",
                        help="comma-separated certifiers to time as well as each run's default, "
                             "where they apply")
    parser.add_argument("--limit", type=int, help="certify the first N test points only")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--stat", choices=list(STATS), default="median",
                        help="each side's time over the repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch (OMP_NUM_THREADS) and numba threads per process")
    parser.add_argument("--bounds-args", default="--keep-freed-memory",
                        help="arguments added to each bounds_speed.py process, given with "
                             "'=' (--bounds-args='--models dm-medium --repeats 5'); default: "
                             "keep freed memory, as the certnet command does")
    parser.add_argument("--skip-bounds", action="store_true", help="no bounds_speed rows")
    parser.add_argument("--skip-certify", action="store_true", help="no certify rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [] if args.skip_certify else [p.resolve() for p in args.runs or default_runs()]
    extra = [c for c in (args.certifiers or "").split(",") if c]
    env = thread_env(args.threads)
    result: dict[str, Any] = {
        "baseline": {"rev": args.baseline, "commit": commit(args.baseline)},
        "current": {"rev": args.current or "working tree"}, "limit": args.limit,
        "repeats": args.repeats, "statistic": args.stat, "threads": args.threads,
        "seconds": "certify rows: time inside the certify calls (certnet's report); bounds "
                   "rows: bounds_speed.py's certnet_s (its own median of its --repeats)",
        "machine": cpu_model(), "command": "python " + " ".join(sys.argv), "rows": []}
    with checkouts(args.baseline, args.current) as roots:
        result["current"].update(state(roots["current"]))
        pairs = []
        if runs:
            known = {side: describe(roots[side] / "src", runs)["models"] for side in SIDES}
            for run in runs:
                info = [known[side][str(run)] for side in SIDES]
                loaded = [i for i in info if "error" not in i]
                for side, i in zip(SIDES, info, strict=True):
                    if "error" in i:  # timed anyway: that side's rows show the error
                        print(f"{run.name}: {side}: {i['error']}", flush=True)
                if loaded:
                    default = loaded[0]["default"]
                    pairs.append((run, default))
                    pairs += [(run, c) for c in extra if c != default
                              and all(c in i["certifiers"] for i in loaded)]
        total = len(pairs) * 2 * (args.repeats + 1) + (0 if args.skip_bounds else
                                                       2 * args.repeats)
        with tqdm(total=total, unit="process", file=sys.stderr) as bar:
            for run, certifier in pairs:
                row = certify_row(roots, run, certifier, args, env, bar)
                result["rows"].append(row)
                write_atomic(args.out, result)
                tqdm.write(f"{table([row]).splitlines()[-1]}  n={row.get('n')}{errors(row)}")
            if not args.skip_bounds:
                for row in bounds_rows(roots, args, env, bar):
                    result["rows"].append(row)
                    tqdm.write(table([row]).splitlines()[-1] + errors(row))
                write_atomic(args.out, result)
    print(f"\n{args.stat} of {args.repeats} alternating runs per side, {args.threads} "
          f"thread(s), baseline {args.baseline} vs {result['current']['rev']} "
          f"({result['current']['commit']}); ratio = current / baseline\n")
    print(table(result["rows"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
