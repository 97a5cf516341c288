"""What each part of the local Lipschitz certificate costs and buys (Huang et al. 2021; the
issue's "measure what each costs and buys"): for each model, the VRA and certification time of
the global ``lipschitz`` certificate, of ``local-lipschitz`` with every part, and of
``local-lipschitz`` with one part switched off at a time, or with only the masked head:

* Frobenius: ||A_RS||_F on masked dense and convolution weights;
* Schur: the Schur test on |A_RS| (convolutions);
* Gram split: the rank-32 Gram split of dense weights (a 32x32 eigenproblem per point);
* box head: the margin's shift over the head input's l2 ball intersected with its interval.

The masked head (GloRo's pairwise K_ij on the head inputs that can change) is part of every
local variant. A part is switched off by making its bound infinite, so the certificate stays
sound in every variant; each variant certifies the same 10k points in the same process, after
the once-per-model constants (the float64 copy, the Gram splits) are computed.

Writes ``benchmarks/results/local_bounds.json`` and prints a markdown table.

    python benchmarks/local_bounds.py --runs models/gloro-mnist-1.58-2c2f-crelu-cpu \\
        models/gloro-local-mnist-1.58-2c2f-cpu
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from local_lipschitz import load_run
from machine import certnet_commit, cpu_model

from certnet.bounds import local
from certnet.certifiers import local_lipschitz
from certnet.certify import evaluate
from certnet.checkpoint import write_json
from certnet.nn.masked_spectral import GramTail

RESULTS = Path(__file__).parent / "results" / "local_bounds.json"


def _infinite(*args: torch.Tensor) -> torch.Tensor:
    """A bound that bounds nothing: +inf per point (the batch size of the first mask or of
    the last argument)."""
    like = next((a for a in reversed(args) if isinstance(a, torch.Tensor) and a.dim() >= 1),
                args[-1])
    return torch.full((like.shape[0],), torch.inf, dtype=torch.float64, device=like.device)


def _no_shift(moves: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    return torch.full(moves.shape[:2], torch.inf, dtype=torch.float64, device=moves.device)


#: part -> the (owner, name) patches that switch it off
PARTS = {
    "Frobenius": [(local, "dense_frobenius"), (local, "conv_frobenius")],
    "Schur": [(local, "conv_schur")],
    "Gram split": [(GramTail, "bound")],
    "box head": [(local_lipschitz, "ball_box_shift")],
}


@contextlib.contextmanager
def without(parts: list[str]) -> Iterator[None]:
    saved = []
    try:
        for part in parts:
            for owner, name in PARTS[part]:
                saved.append((owner, name, getattr(owner, name)))
                off = _no_shift if part == "box head" else (
                    (lambda self, keep: _infinite(keep)) if owner is GramTail else _infinite)
                setattr(owner, name, off)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def variants() -> dict[str, tuple[str, list[str]]]:
    """name -> (certifier, parts switched off)"""
    rows = {"global": ("lipschitz", []), "local, every part": ("local-lipschitz", [])}
    for part in PARTS:
        rows[f"local without {part}"] = ("local-lipschitz", [part])
    rows["local, masked head only"] = ("local-lipschitz", list(PARTS))
    return rows


def measure(run: Path, limit: int | None) -> dict:
    model, data, eps = load_run(run, limit)
    row = {"run": run.name, "lipschitz_training": model.method_config().get("lipschitz"),
           "eps": eps, "n": len(data), "variants": {}}
    # the once-per-model constants (float64 copy, Gram splits) out of the timings
    _, warm, _ = load_run(run, 8)
    for certifier in ("lipschitz", "local-lipschitz"):
        evaluate(model, warm, eps, certifier=certifier)
    for name, (certifier, off) in variants().items():
        with without(off):
            report = evaluate(model, data, eps, certifier=certifier)
        row["variants"][name] = {"vra": report.vra, "seconds": report.seconds,
                                 "certifier": certifier, "off": off}
        print(f"{run.name}: {name}: VRA {100 * report.vra:.2f}%  {report.seconds:.1f} s",
              flush=True)
    return row


def table(rows: list[dict]) -> str:
    names = list(variants())
    lines = ["| variant | " + " | ".join(f"{r['run']} VRA % / s" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in names:
        cells = [f"{100 * r['variants'][name]['vra']:.2f} / {r['variants'][name]['seconds']:.1f}"
                 for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--limit", type=int, help="certify the first N test points only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [measure(run, args.limit) for run in args.runs]
    write_json(args.out, {"runs": rows, "machine": cpu_model(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "commit": certnet_commit(), "command": "python " + " ".join(sys.argv)})
    print(table(rows))


if __name__ == "__main__":
    main()
