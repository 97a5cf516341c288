"""Speed of the l_inf-dist neuron's kernels (certnet.nn.linf_dist_kernels), side by side in one
process: forward + backward of u = ||x[b] - w[o]||_p (Zhang et al., ICML 2021) at p = 8 and
p = inf, B = 256, in = out = 1024, float32, by (a) the naive broadcast reference (the full
B x out x in tensor in plain autograd), (b) the blocked torch backend, (c) the numba backend,
and (d) a dense matmul ``x @ w.T`` of the same shape (the practical ceiling: same
B * out * in multiply-adds, done by BLAS).

Wall milliseconds are the median of ``--repeats`` after one untimed warm-up (which also
loads or compiles the numba kernels); the methods alternate within each repeat, so they share
the machine's load alike. The naive reference runs once, without warm-up (about 5 s and a few
GiB at the full shape). Also the largest |difference| of u and of the gradients between the
backends and against the naive reference.

Writes ``benchmarks/results/linf_dist_speed.json`` (machine, load average, torch and numba
versions and threads, commit) and prints a markdown table; "/ matmul" = time / matmul's time
(fwd + bwd), "speed-up vs naive" = naive's time / time.

    python benchmarks/linf_dist_speed.py [--threads N] [--repeats 5] [--quick]

``--threads N`` sets both torch's and numba's threads (default: torch.get_num_threads()).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import certnet_commit, cpu_model

from certnet.checkpoint import write_json
from certnet.nn.linf_dist_kernels import linf_dist, linf_dist_reference, numba_available

OUT = Path(__file__).parent / "results" / "linf_dist_speed.json"
FULL = (256, 1024, 1024)  # B, in, out
QUICK = (64, 256, 256)
PS = (8.0, math.inf)
METHODS = ("naive", "torch", "numba", "matmul")






def step(method: str, p: float, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
         backward: bool = True) -> tuple[torch.Tensor, ...]:
    """One forward (and backward) pass: (u, grad x, grad w), detached."""
    if method == "matmul":
        u = x @ w.T
    elif method == "naive":
        u = linf_dist_reference(x, w, p)
    else:
        u = linf_dist(x, w, p, backend=method)
    if not backward:
        return (u.detach(),)
    return (u.detach(), *torch.autograd.grad(u, (x, w), g))


def timed(fn: Callable[[], tuple]) -> tuple[float, tuple]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def bench(p: float, shape: tuple[int, int, int], dtype: torch.dtype, repeats: int,
          naive_repeats: int, methods: list[str]) -> list[dict]:
    n_b, n_in, n_out = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n_b, n_in, generator=gen, dtype=dtype).requires_grad_()
    w = torch.rand(n_out, n_in, generator=gen, dtype=dtype).requires_grad_()
    g = torch.randn(n_b, n_out, generator=gen, dtype=dtype)
    fast = [m for m in methods if m != "naive"]
    for m in fast:  # warm-up: numba loads (or compiles) its kernels here
        step(m, p, x, w, g)
        step(m, p, x, w, g, backward=False)
    runs: dict[str, dict[str, list[float]]] = {m: {"fwd": [], "fwd_bwd": []} for m in methods}
    results: dict[str, tuple] = {}
    for _ in range(repeats):  # alternate, so all see the same machine load
        for m in fast:
            t, _ = timed(lambda m=m: step(m, p, x, w, g, backward=False))
            runs[m]["fwd"].append(t)
            t, results[m] = timed(lambda m=m: step(m, p, x, w, g))
            runs[m]["fwd_bwd"].append(t)
    if "naive" in methods:
        for _ in range(naive_repeats):
            t, results["naive"] = timed(lambda: step("naive", p, x, w, g))
            runs["naive"]["fwd_bwd"].append(t)
    rows = []
    for m in methods:
        row = {"p": p, "method": m, "batch": n_b, "in": n_in, "out": n_out,
               "dtype": str(dtype).removeprefix("torch."),
               "fwd_ms": statistics.median(runs[m]["fwd"]) if runs[m]["fwd"] else None,
               "fwd_bwd_ms": statistics.median(runs[m]["fwd_bwd"]),
               "fwd_runs_ms": runs[m]["fwd"], "fwd_bwd_runs_ms": runs[m]["fwd_bwd"]}
        if m != "matmul":  # agreement of u, grad x, grad w with the other l_p methods
            for other in ("naive", "torch"):
                if other != m and other in results:
                    row[f"max_abs_diff_vs_{other}"] = max(
                        float((a.double() - b.double()).abs().max())
                        for a, b in zip(results[m], results[other], strict=True))
        rows.append(row)
    base = {r["method"]: r["fwd_bwd_ms"] for r in rows}
    for r in rows:
        r["time_vs_matmul"] = r["fwd_bwd_ms"] / base["matmul"] if "matmul" in base else None
        r["speedup_vs_naive"] = base["naive"] / r["fwd_bwd_ms"] if "naive" in base else None
    return rows


def fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| p | method | fwd ms | fwd+bwd ms | / matmul | speed-up vs naive "
             "| max \\|diff\\| vs naive |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['p']:g} | {r['method']} | {fmt(r['fwd_ms'])} | "
                     f"{fmt(r['fwd_bwd_ms'])} | {fmt(r['time_vs_matmul'], '.2f')} | "
                     f"{fmt(r['speedup_vs_naive'], '.1f')} | "
                     f"{fmt(r.get('max_abs_diff_vs_naive'), '.1e')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and numba threads (default: torch.get_num_threads())")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=1,
                        help="runs of the naive reference (no warm-up; ~5 s each at full size)")
    parser.add_argument("--quick", action="store_true",
                        help=f"B, in, out = {QUICK} instead of {FULL}")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    methods = list(args.methods)
    numba_version = numba_layer = numba_threads = None
    if numba_available():
        import numba  # noqa: PLC0415 -- optional

        numba.set_num_threads(threads)
        numba_version = numba.__version__
    elif "numba" in methods:
        print("numba is not installed: no numba column", flush=True)
        methods.remove("numba")
    shape = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, numba {numba_version}, {threads} threads; "
          f"B, in, out = {shape}, {args.dtype}", flush=True)
    load_before = os.getloadavg()
    rows = []
    for p in PS:
        for r in bench(p, shape, dtype, args.repeats, args.naive_repeats, methods):
            rows.append(r)
            print(f"  p={p:g} {r['method']}: fwd+bwd {r['fwd_bwd_ms']:.1f} ms", flush=True)
    if numba_version is not None:
        numba_layer = numba.threading_layer()
        numba_threads = numba.get_num_threads()
    payload = {
        "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba": numba_version,
        "numba_threads": numba_threads,
        "numba_threading_layer": numba_layer,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "certnet_commit": certnet_commit(),
        "setup": "x ~ U[0,1]^(B x in), w ~ U[0,1]^(out x in), upstream gradient ~ N(0,1), "
                 "seed 0; fwd+bwd = forward + torch.autograd.grad w.r.t. x and w; median of "
                 "the repeats after one warm-up (naive: no warm-up); / matmul = time / "
                 "matmul's fwd+bwd time; speed-up vs naive = naive's time / time",
        "repeats": args.repeats,
        "naive_repeats": args.naive_repeats,
        "rows": rows,
    }
    write_json(args.out, payload)
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
