"""Do two checkouts certify the same bits? A refactor check: ``certnet certify RUN --certifier
C --norm N --eps E --limit K --per-point`` from a baseline commit (a temporary ``git
worktree``) and from this working tree, and the two per-point CSVs (label, prediction,
certified, the radius written exactly, the certifier that proved it) compared byte for byte.

Checkpoints the baseline cannot read (a newer checkpoint format) are certified as copies
made by ``format1_copies.py`` (that commit's config.json, the same weights); this tree reads
both, so both sides certify the very same files.

    python benchmarks/same_certificates.py --baseline 5a7ff9e --copies /tmp/v1models \\
        gloro-mnist-0.3-2c2f:crown:linf:0.1:4 gloro-mnist-0.3-2c2f:best:l2:0.3:4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from checkouts import ROOT, checkouts, commit, run_certnet, state, thread_env, write_json

RESULTS = Path(__file__).parent / "results" / "same_certificates.json"


def per_point(src: Path, run: Path, certifier: str, norm: str, eps: str, limit: str) -> bytes:
    """The per-point CSV of one certification from the checkout whose source is ``src``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "points.csv"
        run_certnet(src, ["certify", str(run), "--device", "cpu", "--certifier", certifier,
                          "--norm", norm, "--eps", eps, "--limit", limit, "--per-point",
                          str(out)], thread_env(1))
        return out.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", metavar="MODEL:CERTIFIER:NORM:EPS:LIMIT",
                        help="a committed model (models/NAME) and how to certify it")
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--copies", type=Path, help="format1_copies.py's folder: the "
                        "baseline certifies these copies of the models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with checkouts(commit(args.baseline)) as roots:
        for case in args.cases:
            name, certifier, norm, eps, limit = case.split(":")
            ours = ROOT / "models" / name
            theirs = args.copies / name if args.copies else ours
            same = per_point(roots["current"] / "src", ours, certifier, norm, eps, limit) == \
                per_point(roots["baseline"] / "src", theirs, certifier, norm, eps, limit)
            rows.append({"case": case, "same": same})
            print(f"{case:<60} {'same' if same else 'DIFFERENT'}", flush=True)
    write_json(args.out, {"baseline": commit(args.baseline), "current": state(ROOT),
                          "rows": rows})
    print(f"{sum(r['same'] for r in rows)}/{len(rows)} the same; results: {args.out}")


if __name__ == "__main__":
    main()
