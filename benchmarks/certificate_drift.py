"""Every committed model's verified accuracy before and after a change, certifier by certifier:
for each directory in models/ and each certifier that applies to it (the library's own
``applicable``, plus ``best``, asked in each checkout), ``certnet certify --per-point`` from a
baseline commit (default d681206, before the floating-point rigour work) and from this working
tree (or ``--current COMMIT``) on the same points, and the per-point CSVs compared.

Per (model, certifier): n, clean accuracy, VRA before and after, the difference in percentage
points, and the points certified before but not after ("lost") and after but not before
("gained"), counted on the CSVs' ``certified`` column (any prediction) and on verified points
(certified and correct; these give the VRA difference), with the first indices of each.
Pairs run cheapest certifier first. Results go to ``benchmarks/results/certificate_drift.json``
after every pair, a ``--limit`` run's apart from the whole test set's; a pair already there
(same baseline and limit, no error) is skipped unless ``--force``, so an interrupted run
resumes. Each pair records the current tree it was measured on (commit and a hash of src/
changes): pass ``--current COMMIT`` for one fixed tree over a run of hours. Prints a markdown
table (``--table``: only that).

    python benchmarks/certificate_drift.py --skip-slow
    python benchmarks/certificate_drift.py --certifiers crown,alpha-crown,best --limit 500 \
        --models models/ibp-* models/crown-ibp-* models/gloro-mnist-0.3-2c2f
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from checkouts import ROOT, certify, checkouts, commit, describe, state, thread_env
from checkouts import write_json as write_atomic
from machine import cpu_model
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results" / "certificate_drift.json"
BASELINE = "d681206"
#: Side of the comparison -> the checkout that gives it.
CHECKOUT = {"before": "baseline", "after": "current"}
SIDES = tuple(CHECKOUT)
#: Certifiers that take tens of minutes per 10k points on a conv net (left out by --skip-slow).
SLOW = ("crown", "alpha-crown", "best")
#: Indices of lost / gained points kept per pair.
KEEP_INDICES = 50


class Points(NamedTuple):
    labels: list[int]
    correct: list[bool]
    certified: list[bool]  # the CSV's column (any prediction)
    verified: list[bool]  # certified and correct


def read_points(path: Path) -> Points:
    """One checkout's per-point CSV."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    correct = [int(r["pred"]) == y for r, y in zip(rows, labels, strict=True)]
    certified = [r["certified"] == "1" for r in rows]
    return Points(labels, correct, certified,
                  [c and k for c, k in zip(certified, correct, strict=True)])


def compare(before: Points, after: Points) -> dict[str, Any]:
    """Lost and gained points between two checkouts' certificates of the same test points."""
    if before.labels != after.labels:
        raise RuntimeError("the two checkouts certified different points")
    pairs = list(enumerate(zip(before.certified, after.certified, strict=True)))
    lost = [i for i, (b, a) in pairs if b and not a]
    gained = [i for i, (b, a) in pairs if a and not b]
    verified = list(zip(before.verified, after.verified, strict=True))
    return {"certified_lost": len(lost), "certified_gained": len(gained),
            "verified_lost": sum(b and not a for b, a in verified),
            "verified_gained": sum(a and not b for b, a in verified),
            "prediction_changed": sum(b != a for b, a in zip(before.correct, after.correct,
                                                             strict=True)),
            "lost_indices": lost[:KEEP_INDICES], "gained_indices": gained[:KEEP_INDICES]}


def measure(roots: dict[str, Path], model: Path, certifier: str, applies: dict[str, bool],
            limit: int | None, env: dict[str, str]) -> dict[str, Any]:
    """Certify one (model, certifier) from both checkouts and compare the points (the
    percentages are counted on the per-point CSVs)."""
    entry: dict[str, Any] = {"model": model.name, "certifier": certifier, "limit": limit}
    points = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, checkout in CHECKOUT.items():
            if not applies[side]:
                entry[f"not_applicable_{side}"] = True
                continue
            out = Path(tmp) / f"{side}.csv"
            try:
                result = certify(roots[checkout] / "src", model, certifier, limit, env, out)
            except RuntimeError as err:
                entry[f"error_{side}"] = str(err)
                continue
            points[side] = p = read_points(out)
            entry["n"] = n = len(p.labels)
            entry[f"clean_pct_{side}"] = 100 * sum(p.correct) / n
            entry[f"vra_pct_{side}"] = 100 * sum(p.verified) / n
            entry[f"certified_{side}"] = sum(p.certified)
            entry[f"seconds_{side}"] = result["seconds"]
            entry[f"certified_by_{side}"] = result["certified_by"]
    if len(points) == 2:
        entry["diff_pp"] = entry["vra_pct_after"] - entry["vra_pct_before"]
        entry.update(compare(points["before"], points["after"]))
    return entry


def key(model: str, certifier: str, limit: int | None) -> str:
    """A pair's key in the results: measurements on the first N points are kept apart."""
    return f"{model} / {certifier}" + (f" / first {limit}" if limit else "")


def done(entry: dict[str, Any] | None, baseline: str) -> bool:
    """Whether a stored pair needs no new measurement."""
    return (entry is not None and entry.get("baseline_commit") == baseline
            and not any(k.startswith("error_") for k in entry))


def cell(entry: dict[str, Any], field: str, spec: str) -> str:
    if field in entry:
        return format(entry[field], spec)
    side = field.rsplit("_", 1)[-1]
    return ("error" if f"error_{side}" in entry
            else "n/a" if f"not_applicable_{side}" in entry else "–")


def table(entries: list[dict[str, Any]]) -> str:
    lines = ["| model | certifier | n | clean % | VRA % before | VRA % after | Δ pp | "
             "certified before, not after | after, not before |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        clean = e.get("clean_pct_before", e.get("clean_pct_after"))
        lines.append(f"| {e['model']} | {e['certifier']} | {e.get('n', '–')} | "
                     f"{'–' if clean is None else format(clean, '.2f')} | "
                     f"{cell(e, 'vra_pct_before', '.2f')} | {cell(e, 'vra_pct_after', '.2f')} | "
                     f"{format(e['diff_pp'], '+.2f') if 'diff_pp' in e else '–'} | "
                     f"{e.get('certified_lost', '–')} | {e.get('certified_gained', '–')} |")
    return "\n".join(lines)


def errors(entry: dict[str, Any]) -> str:
    """The last line of each side's error (a traceback's own message), if any."""
    return "".join(f"\n  {side} failed: {entry[f'error_{side}'].splitlines()[-1]}"
                   for side in SIDES if f"error_{side}" in entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="commit to compare against")
    parser.add_argument("--current", help="a commit to measure instead of this working tree")
    parser.add_argument("--models", type=Path, nargs="+",
                        help="checkpoint directories (default: every one in models/)")
    parser.add_argument("--certifiers", help="comma-separated: only these certifiers")
    parser.add_argument("--limit", type=int, help="certify the first N test points only")
    parser.add_argument("--skip-slow", action="store_true",
                        help=f"leave out {', '.join(SLOW)} on conv nets (tens of minutes each)")
    parser.add_argument("--force", action="store_true", help="re-measure pairs already stored")
    parser.add_argument("--threads", type=int,
                        help="torch and numba threads per process (default: the CLI's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print the stored table")
    args = parser.parse_args()
    stored = json.loads(args.out.read_text()) if args.out.exists() else {"pairs": {}}
    if args.table:
        print(table(list(stored["pairs"].values())))
        return
    models = [p.resolve() for p in args.models or sorted((ROOT / "models").iterdir())
              if p.is_dir()]
    only = set(args.certifiers.split(",")) if args.certifiers else None
    baseline = commit(args.baseline)
    with checkouts(args.baseline, args.current) as roots:
        current = {"rev": args.current or "working tree", **state(roots["current"])}
        print(f"baseline {args.baseline} ({baseline}), current {current['rev']} "
              f"({current['commit']})", flush=True)
        known = {side: describe(roots[checkout] / "src", models)
                 for side, checkout in CHECKOUT.items()}
        costs = {**known["before"]["costs"], **known["after"]["costs"]}
        pairs = []
        for model in models:
            info = {side: known[side]["models"][str(model)] for side in SIDES}
            for side in SIDES:
                if "error" in info[side]:  # its pairs are tried anyway, and fail with the error
                    print(f"{model.name}: {side}: {info[side]['error']}", flush=True)
            loaded = [i for i in info.values() if "error" not in i]
            names = list(dict.fromkeys(n for i in loaded for n in i["certifiers"]))
            for name in names:
                slow = args.skip_slow and loaded[0]["conv"] and name in SLOW
                if (only is None or name in only) and not slow:
                    applies = {side: "error" in i or name in i["certifiers"]
                               for side, i in info.items()}
                    pairs.append((costs.get(name, 0), model, name, applies))
        pairs.sort(key=lambda p: (p[0], p[1].name))
        todo = [p for p in pairs if args.force
                or not done(stored["pairs"].get(key(p[1].name, p[2], args.limit)), baseline)]
        print(f"{len(pairs)} (model, certifier) pairs, {len(pairs) - len(todo)} already in "
              f"{args.out}", flush=True)
        env = thread_env(args.threads)
        for _, model, name, applies in tqdm(todo, unit="pair", file=sys.stderr):
            entry = measure(roots, model, name, applies, args.limit, env)
            entry.update(baseline_commit=baseline, current=current)
            stored["pairs"][key(model.name, name, args.limit)] = entry
            stored.update(baseline={"rev": args.baseline, "commit": baseline},
                          machine=cpu_model(), command="python " + " ".join(sys.argv))
            write_atomic(args.out, stored)
            tqdm.write(table([entry]).splitlines()[-1] + errors(entry))
    order = {(p[1].name, p[2]): i for i, p in enumerate(pairs)}
    entries = sorted(stored["pairs"].values(), key=lambda e: (
        order.get((e["model"], e["certifier"]), len(order)), e["limit"] or 0))
    print("\n" + table(entries))
    trees = {(e["current"]["commit"], e["current"]["src_changes_sha1"]) for e in entries
             if "current" in e}
    if len(trees) > 1:
        print(f"\nnote: these pairs were measured against {len(trees)} different current "
              "trees (see each pair's 'current' in the JSON)")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
