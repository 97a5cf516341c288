"""How many coefficients one backward pass of full CROWN's intermediate bounds should hold
(``certnet.bounds.crown.CHUNK_ELEMENTS`` on full maps, ``PATCH_CHUNK_ELEMENTS`` on patches;
chunks of points and neurons): the same bounds at every size, only speed and memory differ,
so the size is measured; each run sets both to the size.

Workloads, float64, one thread, full CROWN (``margin_bounds(..., "crown")``) of the margins of
the predicted class over an l_inf ball: the VNN-COMP ``mnist-net_256x4`` (dense layers) on
1024 random points, eps 0.02; the ResNet-style torch model of ``resnet_bounds.py`` (residual
steps: full coefficient maps) on 8 points, eps 0.02; DM-small (a conv chain: CROWN's patches
mode, which reads the same constant) on 64 points, eps 0.1, float32. Each (workload, size)
runs in a fresh process keeping freed memory (as the ``certnet`` command does); seconds are the
median of ``--repeats`` calls after one untimed call. Writes
``benchmarks/results/crown_chunks.json`` and prints a table:

    OMP_NUM_THREADS=1 python benchmarks/crown_chunks.py --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "crown_chunks.json"
WORKLOADS = ("mnist-256x4", "resnet", "dm-small")
SIZES = (2 ** 19, 2 ** 20, 2 ** 21, 2 ** 23, 2 ** 25)


def workload(name: str):
    """(layers, x, threat, eps) of a workload."""
    from certnet.threat import ThreatModel  # noqa: PLC0415

    if name == "mnist-256x4":
        from vnncomp_bounds import ROOT, properties  # noqa: PLC0415

        from certnet.graph.onnx_import import load_onnx  # noqa: PLC0415

        onnx = properties(ROOT, name, 1)[0][0]
        layers = copy.deepcopy(load_onnx(onnx).sequential()).double().eval()
        x = torch.rand(1024, 1, 28, 28, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0))
        return layers, x, ThreatModel("linf", 0.02)
    if name == "resnet":
        from resnet_bounds import setup  # noqa: PLC0415

        import certnet  # noqa: PLC0415

        model, x, _ = setup(8, 8)
        return certnet.bounded(model, (1, 28, 28)).layers, x, ThreatModel("linf", 0.02)
    from certnet.archs import build_arch  # noqa: PLC0415

    layers = build_arch("dm-small", (1, 28, 28), 10, seed=0, init="ibp").eval()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return layers, x, ThreatModel("linf", 0.1)


def child(name: str, size: int, repeats: int) -> dict:
    from certnet.bounds import crown, margin_bounds  # noqa: PLC0415
    from certnet.memory import keep_freed_memory  # noqa: PLC0415

    keep_freed_memory()
    crown.CHUNK_ELEMENTS = crown.PATCH_CHUNK_ELEMENTS = size
    layers, x, threat = workload(name)
    for p in layers.parameters():
        p.requires_grad_(False)
    times = []
    with torch.no_grad():
        ref = layers(x).argmax(1)
        lower = margin_bounds(layers, x, threat, ref, "crown")  # untimed
        for _ in range(repeats):
            start = time.perf_counter()
            margin_bounds(layers, x, threat, ref, "crown")
            times.append(time.perf_counter() - start)
    return {"workload": name, "chunk_elements": size, "seconds": statistics.median(times),
            "runs": times, "lower_sum": float(lower.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return
    from machine import certnet_commit, cpu_model  # noqa: PLC0415

    from certnet.checkpoint import write_json  # noqa: PLC0415

    rows = []
    for name in args.workloads:
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", name, str(size),
                                  "--repeats", str(args.repeats)], capture_output=True,
                                 text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
                else {"workload": name, "chunk_elements": size,
                      "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
            rows.append(row)
            print(f"  {name} 2^{size.bit_length() - 1}: {row.get('seconds', row.get('error'))}",
                  flush=True)
    write_json(args.out, {"machine": cpu_model(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "certnet_commit": certnet_commit(), "repeats": args.repeats,
                          "rows": rows})
    sizes = sorted({r["chunk_elements"] for r in rows})
    print("| workload | " + " | ".join(f"2^{s.bit_length() - 1}" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in args.workloads:
        cells = {r["chunk_elements"]: r for r in rows if r["workload"] == name}
        print(f"| {name} | " + " | ".join(
            f"{cells[s]['seconds']:.2f}" if "seconds" in cells.get(s, {}) else "-"
            for s in sizes) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
