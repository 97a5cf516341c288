"""CROWN and alpha-CROWN on a torch ResNet-style block model: certnet against auto_LiRPA, speed,
peak memory and tightness, side by side in one run (issue 27, §5).

The model (:class:`ResNetBlocks`, seeded random weights, MNIST-shaped 1x28x28 inputs): a
strided conv stem, residual blocks x + conv(relu(conv(x))) at two widths with a strided conv
between, average pooling and a dense head; a plain ``nn.Module`` with the residual adds in
``forward``, which certnet reads through torch.fx (``certnet.bounded``) and auto_LiRPA traces
itself. For a batch of random points, the lower bounds of the margins z_y - z_j (y the
predicted class) over the l_inf ball of ``--eps`` by

* certnet ``spec_bounds(..., rigorous=True)`` on the graph's chain (what ``certify`` and
  ``verify`` prove with), and ``rigorous=False`` (the plain float bound);
* auto_LiRPA ``compute_bounds(C=spec, method="CROWN")``; for alpha-CROWN its CROWN pass then
  ``CROWN-Optimized`` with those intermediate bounds fixed, 20 Adam steps at lr 0.1 (certnet's
  alpha-CROWN; see benchmarks/vnncomp_bounds.py).

Every (side, repeat) runs in a fresh subprocess, the sides alternating, so each process's peak
resident memory (getrusage) is its side's alone: ``peak MB`` is the growth of the peak over
what the process held before bounding (model, inputs and auto_LiRPA's traced graph built),
``process MB`` the whole process's peak. Every process keeps freed memory (certnet.memory, as
the ``certnet`` command's does: a fresh coefficient tensor then reuses freed pages instead of
faulting in new ones); ``--default-allocator`` leaves glibc's defaults. Seconds are the
median over ``--repeats`` of the bound call alone. Writes
``benchmarks/results/resnet_bounds.json`` and prints a table.
Reproduce (``scripts/setup-auto-lirpa.sh`` builds the environment):

    OMP_NUM_THREADS=1 .venv-auto-lirpa/bin/python benchmarks/resnet_bounds.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).parent / "results" / "resnet_bounds.json"
SIDES = ("certnet", "certnet-plain", "auto_lirpa")
METHODS = {"crown": "CROWN", "alpha-crown": "CROWN-Optimized"}
ALPHA_OPTS = {"iteration": 20, "lr_alpha": 0.1, "lr_decay": 1.0, "optimizer": "adam",
              "keep_best": True, "fix_intermediate_layer_bounds": True,
              "early_stop_patience": 10 ** 9}


class Block(nn.Module):
    """x + conv(relu(conv(x))): a ResNet basic block without normalisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResNetBlocks(nn.Module):
    """stem conv (stride 2) -> block -> conv (stride 2) -> block -> avg pool -> dense."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, stride=2, padding=1)  # 14 x 14
        self.block1 = Block(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 7 x 7
        self.block2 = Block(2 * width)
        self.pool = nn.AvgPool2d(7)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(torch.relu(self.stem(x)))
        h = self.block2(torch.relu(self.down(h)))
        return self.head(torch.flatten(self.pool(h), 1))


def setup(width: int, points: int, seed: int = 0):
    """The model (float64, eval, no grads), points in [0, 1] and margin specifications."""
    torch.manual_seed(seed)
    model = ResNetBlocks(width).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(points, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        pred = model(x).argmax(1)
    eye = torch.eye(10, dtype=torch.float64)
    spec = torch.stack([eye[y] - eye[[j for j in range(10) if j != y]] for y in pred.tolist()])
    return model, x, spec


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, method: str, width: int, points: int, eps: float,
          keep_memory: bool = True) -> dict:
    """One side's bound in this process: seconds, memory, bounds."""
    torch.set_default_dtype(torch.float64)  # auto_LiRPA casts optimised bounds to it
    if keep_memory:  # as the certnet command's process does, for every side alike
        from certnet.memory import keep_freed_memory  # noqa: PLC0415

        keep_freed_memory()
    model, x, spec = setup(width, points)
    if side == "auto_lirpa":
        sys.path.insert(0, str(Path(__file__).parent))
        from bounds_speed import load_auto_lirpa  # noqa: PLC0415

        lirpa, why = load_auto_lirpa()
        if lirpa is None:
            raise SystemExit(f"auto_LiRPA is needed (scripts/setup-auto-lirpa.sh): {why}")
        bounded = lirpa.BoundedModule(model, torch.empty_like(x),
                                      bound_opts={"optimize_bound_args": ALPHA_OPTS})
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), x_L=(x - eps).clamp(0, 1),
                                       x_U=(x + eps).clamp(0, 1))
        bx = lirpa.BoundedTensor(x, ptb)

        def run():
            lower, _ = bounded.compute_bounds(x=(bx,), C=spec, method="CROWN",
                                              bound_upper=False)
            if method == "alpha-crown":
                fixed = {n.inputs[0].name: (n.inputs[0].lower.detach(),
                                            n.inputs[0].upper.detach())
                         for n in bounded.optimizable_activations}
                lower, _ = bounded.compute_bounds(x=(bx,), C=spec, method="CROWN-Optimized",
                                                  bound_upper=False,
                                                  intermediate_layer_bounds=fixed)
            return lower.detach()
    else:
        import certnet  # noqa: PLC0415
        from certnet.bounds.margins import spec_bounds  # noqa: PLC0415
        from certnet.threat import ThreatModel  # noqa: PLC0415

        chain = certnet.bounded(model, (1, 28, 28)).layers

        def run():
            with torch.no_grad():
                return spec_bounds(chain, x, ThreatModel("linf", eps), spec, method,
                                   rigorous=side == "certnet")
    before = peak_mb()
    start = time.perf_counter()
    lower = run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_mb() - before, "process_mb": peak_mb(),
            "bounds": lower.tolist()}


def spawn(side: str, method: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--methods", method,
                          "--width", str(args.width), "--points", str(args.points),
                          "--eps", str(args.eps)] +
                         (["--default-allocator"] if args.default_allocator else []),
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | method | certnet s rigorous / plain | auto_LiRPA s | ratio rigorous / "
             "plain | peak MB certnet / auto_LiRPA | certnet − auto_LiRPA (min .. max) | "
             "margins proved certnet / auto_LiRPA |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['error']} |||||")
            continue
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['method']} | {s['certnet']:.2f} / {s['certnet-plain']:.2f} | "
            f"{s['auto_lirpa']:.2f} | {s['certnet'] / s['auto_lirpa']:.2f} / "
            f"{s['certnet-plain'] / s['auto_lirpa']:.2f} | {r['peak_mb']['certnet']:.0f} / "
            f"{r['peak_mb']['auto_lirpa']:.0f} | {r['tighter_min']:.2e} .. "
            f"{r['tighter_max']:.2e} | {r['proved']['certnet']} / {r['proved']['auto_lirpa']} "
            f"of {r['margins']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is in every process (by default "
                             "each keeps freed memory, as the certnet command does)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.methods[0], args.width, args.points, args.eps,
                               not args.default_allocator)))
        return
    rows = []
    for method in args.methods:
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for k in range(args.repeats):  # alternate the order, so load falls on all alike
            for side in SIDES if k % 2 == 0 else SIDES[::-1]:
                runs[side].append(spawn(side, method, args))
                print(f"  {method} {side} #{k}: {runs[side][-1].get('seconds', 'error')}",
                      flush=True)
        failed = [r["error"] for rs in runs.values() for r in rs if "error" in r]
        model = f"ResNetBlocks(width={args.width})"
        if failed:
            rows.append({"model": model, "method": method, "error": failed[0]})
            continue
        bounds = {s: torch.tensor(rs[0]["bounds"]) for s, rs in runs.items()}
        gap = bounds["certnet"] - bounds["auto_lirpa"]
        rows.append({
            "model": model, "method": method, "repeats": args.repeats,
            "seconds": {s: statistics.median(r["seconds"] for r in rs) for s, rs in runs.items()},
            "peak_mb": {s: max(r["peak_mb"] for r in rs) for s, rs in runs.items()},
            "process_mb": {s: max(r["process_mb"] for r in rs) for s, rs in runs.items()},
            "runs": {s: [r["seconds"] for r in rs] for s, rs in runs.items()},
            "tighter_min": float(gap.min()), "tighter_max": float(gap.max()),
            "margins": gap.numel(),
            "proved": {s: int((b > 0).sum()) for s, b in bounds.items()},
            "bounds": {s: b.tolist() for s, b in bounds.items()}})
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import certnet_commit, cpu_model  # noqa: PLC0415

    from certnet.checkpoint import write_json  # noqa: PLC0415

    write_json(args.out, {
        "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "certnet_commit": certnet_commit(), "width": args.width, "points": args.points,
        "eps": args.eps, "auto_lirpa_alpha_options": ALPHA_OPTS,
        "setup": "every (side, repeat) a fresh process, sides alternating; seconds = median "
                 "of the bound call; peak_mb = growth of the process's peak RSS during it; "
                 "tighter = certnet rigorous bound - auto_LiRPA bound (positive: tighter)",
        "keep_freed_memory": not args.default_allocator,
        "rows": rows})
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
