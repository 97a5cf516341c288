"""CROWN and alpha-CROWN on real VNN-COMP networks: certnet against auto_LiRPA, side by side in
one process, speed and tightness per property.

Networks (``/work/shared/benchmarks/vnncomp``, see its README): the VNN-COMP 2022 ``mnist_fc``
nets 256x2, 256x4, 256x6 with their ``instances.csv`` properties, and ERAN's
``mnist_relu_9_200`` with the properties of its instance list that are shipped
(``eran/specs/mnist``). For every property (its one input box; the violation rows c . y <= d,
all rows at once as one specification C), the lower bounds of C . y over the box by CROWN and
alpha-CROWN, and the wall seconds (median of ``--repeats``; the sides alternate, so they share
the machine's load alike; one untimed warm-up per network and method) of:

* certnet ``spec_bounds(..., rigorous=True)`` (what ``certnet verify`` proves with: below the
  exact value and that of the float forward pass), keeping the weight quantities its walks
  read (|W|; W/2 and |W|/2 for convolutions) across a network's properties, as
  ``certnet verify`` does with its one float64 copy per network (``certnet.decide.prepare``),
* certnet ``spec_bounds(..., rigorous=False)`` (the plain float bound),
* auto_LiRPA ``compute_bounds(C=C, method="CROWN")``, and for alpha-CROWN its CROWN pass then
  ``method="CROWN-Optimized"`` with that pass's intermediate bounds fixed
  (``intermediate_layer_bounds``), 20 Adam steps at lr 0.1, no lr decay, no early stop, best
  iterate kept: certnet's alpha-CROWN (certnet.bounds.alpha_crown). auto_LiRPA 0.3 left to
  itself recomputes every intermediate layer with optimised slopes in each step (tighter,
  several times slower: not the same algorithm); given no intermediate bounds its
  CROWN-Optimized also fails an assertion on its sparse intermediate bounds. A fresh
  auto_LiRPA module per property (traced untimed: a reused one fails on the next box); where
  its sparse alphas fail a shape check (some ERAN boxes), that property is measured again
  with dense alphas (``sparse_features_alpha=False``; the row says so).

Both sides bound the same torch network (certnet's ``load_onnx(...).sequential()``; auto_LiRPA
traces certnet's Normalize as it is) in ``--dtype`` (float64 by default: certnet's
certificates compute in float64; torch's default dtype is set to it, since auto_LiRPA casts
its optimised bounds to the default dtype). Tightness = certnet bound - auto_LiRPA bound per
row (positive: certnet tighter), min and max over the rows, for the rigorous and the plain
bound; a row is proved when its lower bound is above its d, a property when every violation
disjunct has a proved row. ratio = certnet s / auto_LiRPA s (the issue's goal, 1.5x faster,
is a ratio <= 0.667). The process keeps freed memory (certnet.memory, as the ``certnet``
command's own process does; ``--default-allocator`` leaves glibc's defaults, for comparison):
with the defaults, once auto_LiRPA has run in the process, certnet's fresh weight-sized
temporaries map new pages each time, which slows certnet's side and not auto_LiRPA's.
Peak memory is not measured: one process holds both sides, so
getrusage cannot tell them apart, and tracemalloc does not see torch's allocations.

Writes ``benchmarks/results/vnncomp_bounds.json`` and prints a markdown table per network and
method. Reproduce (``scripts/setup-auto-lirpa.sh`` builds the environment):

    OMP_NUM_THREADS=1 .venv-auto-lirpa/bin/python benchmarks/vnncomp_bounds.py --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from bounds_speed import load_auto_lirpa
from machine import certnet_commit, cpu_model

from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules.fixed_weights import fixed_weights
from certnet.checkpoint import write_json
from certnet.graph.onnx_import import load_onnx
from certnet.memory import keep_freed_memory
from certnet.properties import read_instances, read_vnnlib
from certnet.threat import BoxThreat

OUT = Path(__file__).parent / "results" / "vnncomp_bounds.json"
ROOT = Path("/work/shared/benchmarks/vnncomp")
#: network name -> (instances.csv, onnx file name)
NETWORKS = {
    "mnist-256x2": ("mnist_fc/instances.csv", "mnist-net_256x2.onnx"),
    "mnist-256x4": ("mnist_fc/instances.csv", "mnist-net_256x4.onnx"),
    "mnist-256x6": ("mnist_fc/instances.csv", "mnist-net_256x6.onnx"),
    "eran-9x200": ("eran/eran_instances_mnist_relu_9_200_all.csv", "mnist_relu_9_200.onnx"),
}
#: method -> auto_LiRPA's name
METHODS = {"crown": "CROWN", "alpha-crown": "CROWN-Optimized"}
#: certnet's alpha-CROWN (certnet.bounds.alpha_crown: STEPS, LEARNING_RATE; Adam, no decay,
#: all steps, the best iterate per row) in auto_LiRPA 0.3's options
ALPHA_OPTS = {"iteration": 20, "lr_alpha": 0.1, "lr_decay": 1.0, "optimizer": "adam",
              "keep_best": True, "fix_intermediate_layer_bounds": True,
              "early_stop_patience": 10 ** 9}


def properties(root: Path, network: str, limit: int | None) -> list[tuple[Path, Path]]:
    """(onnx, vnnlib) of the network's instances whose files are present, in csv order."""
    csv, onnx_name = NETWORKS[network]
    rows = [(i.onnx, i.vnnlib) for i in read_instances(root / csv)
            if i.onnx.name == onnx_name and i.vnnlib.exists()]
    return rows[:limit] if limit else rows


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def proved(lower: torch.Tensor, disjuncts: list[tuple[torch.Tensor, torch.Tensor]]
           ) -> tuple[int, bool]:
    """(rows with lower > d, whether every disjunct has such a row)."""
    d = torch.cat([d for _, d in disjuncts]).to(lower)
    hit = lower > d
    k, every = 0, True
    for c, _ in disjuncts:
        every &= bool(hit[k:k + len(c)].any())
        k += len(c)
    return int(hit.sum()), every


def bench_network(network: str, root: Path, limit: int | None, methods: list[str],
                  repeats: int, dtype: torch.dtype, lirpa) -> list[dict]:
    props = properties(root, network, limit)
    if not props:
        print(f"{network}: no properties found under {root}", flush=True)
        return []
    g = load_onnx(props[0][0])
    shape = g.input_shape
    net = copy.deepcopy(g.sequential()).to(dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    # the weight quantities certnet's walks keep (|W|, row sums, ...), kept across the network's
    # properties as `certnet verify` keeps them with its one copy per network (decide.prepare)
    store: dict = {}

    def fresh(dense: bool = False):
        """A new auto_LiRPA module (0.3 keeps alpha indices across calls that break on a new
        box); ``dense``: alphas for every neuron, where its sparse ones fail (see main)."""
        opts = {"optimize_bound_args": ALPHA_OPTS}
        if dense:
            opts["sparse_features_alpha"] = False
        return lirpa.BoundedModule(net, torch.empty(1, *shape, dtype=dtype), device="cpu",
                                   bound_opts=opts)
    rows = []
    for method in methods:
        for k, (_, vnnlib) in enumerate(props):
            prop = read_vnnlib(vnnlib)
            lo, hi = prop.box_tensors(0)
            threat = BoxThreat.of(lo.view(shape), hi.view(shape))
            disjuncts = prop.violation_tensors(0)
            spec = torch.cat([c for c, _ in disjuncts]).unsqueeze(0).to(dtype)
            x = threat.center().to(dtype)
            ptb = lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lo.view(1, *shape).to(dtype),
                                           x_U=hi.view(1, *shape).to(dtype))
            bx = lirpa.BoundedTensor(x, ptb)
            bounded = fresh()  # traced per property, untimed
            if k == 0:
                with torch.no_grad():
                    assert torch.equal(bounded(x), net(x)), "auto_LiRPA's forward differs"

            def ours(rigorous: bool, method=method, x=x, threat=threat, spec=spec):
                with torch.no_grad(), fixed_weights(store):
                    return spec_bounds(net, x, threat, spec, method, rigorous=rigorous)[0]

            def theirs(method=method, bx=bx, spec=spec, bounded=bounded):
                lower, _ = bounded.compute_bounds(x=(bx,), C=spec, method="CROWN",
                                                  bound_upper=False)
                if method == "alpha-crown":  # certnet's: CROWN's intermediate bounds, fixed
                    fixed = {n.inputs[0].name: (n.inputs[0].lower.detach(),
                                                n.inputs[0].upper.detach())
                             for n in bounded.optimizable_activations}
                    lower, _ = bounded.compute_bounds(
                        x=(bx,), C=spec, method="CROWN-Optimized", bound_upper=False,
                        intermediate_layer_bounds=fixed)
                return lower.detach()[0]

            sides = {"rigorous": lambda: ours(True), "plain": lambda: ours(False),
                     "auto_lirpa": theirs}
            if k == 0:  # warm-up, untimed
                for fn in sides.values():
                    fn()
            error = None
            for dense in (False, True):
                if dense:  # its sparse alphas failed: again, everything, with dense ones
                    sides["auto_lirpa"] = partial(theirs, bounded=fresh(dense=True))
                times = {s: [] for s in sides}
                result = {}
                try:
                    for _ in range(repeats):  # alternate, so all see the same machine load
                        for s, fn in sides.items():
                            t, result[s] = timed(fn)
                            times[s].append(t)
                    error = None
                    break
                except (AssertionError, RuntimeError) as err:  # reported, not fatal
                    if s != "auto_lirpa":
                        raise
                    error = repr(err)
                    print(f"  {network} {vnnlib.name} {method}: auto_LiRPA failed "
                          f"({'dense' if dense else 'sparse'} alphas): {error}", flush=True)
            if error is not None:
                rows.append({"network": network, "property": vnnlib.name, "method": method,
                             "auto_lirpa_error": error})
                continue
            med = {s: statistics.median(v) for s, v in times.items()}
            theirs_b = result["auto_lirpa"].double()
            tight = result["rigorous"].double() - theirs_b
            tight_plain = result["plain"].double() - theirs_b
            rows_c, prop_c = proved(result["rigorous"], disjuncts)
            rows_l, prop_l = proved(result["auto_lirpa"], disjuncts)
            row = {
                "network": network, "property": vnnlib.name, "method": method,
                "rows": len(theirs_b), "cases": len(prop.cases), "repeats": repeats,
                "auto_lirpa_dense_alpha": dense,
                "certnet_s": med["rigorous"], "certnet_plain_s": med["plain"],
                "auto_lirpa_s": med["auto_lirpa"],
                "ratio": med["rigorous"] / med["auto_lirpa"],
                "ratio_plain": med["plain"] / med["auto_lirpa"],
                "runs": times,
                "tighter_min": float(tight.min()), "tighter_max": float(tight.max()),
                "tighter_plain_min": float(tight_plain.min()),
                "tighter_plain_max": float(tight_plain.max()),
                "rows_proved_certnet": rows_c, "rows_proved_auto_lirpa": rows_l,
                "proved_certnet": prop_c, "proved_auto_lirpa": prop_l,
                "certnet_bounds": result["rigorous"].tolist(),
                "certnet_plain_bounds": result["plain"].tolist(),
                "auto_lirpa_bounds": theirs_b.tolist(),
            }
            rows.append(row)
            print(f"  {network} {vnnlib.name} {method}: certnet {med['rigorous']:.3f} s "
                  f"(plain {med['plain']:.3f}), auto_LiRPA {med['auto_lirpa']:.3f} s; "
                  f"certnet - auto_LiRPA {row['tighter_min']:.3g} .. {row['tighter_max']:.3g} "
                  f"(plain {row['tighter_plain_min']:.3g} .. {row['tighter_plain_max']:.3g}); "
                  f"rows proved {rows_c} / {rows_l}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| network | method | props | certnet s (rigorous) | certnet s (plain) "
             "| auto_LiRPA s | ratio rig. / plain | props >= 1.5x faster rig. / plain "
             "| rows proved certnet / auto_LiRPA | props proved certnet / auto_LiRPA "
             "| certnet - auto_LiRPA, rigorous (min .. max) | same, plain (min .. max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    failed: dict[tuple[str, str], int] = {}
    for r in rows:
        if "auto_lirpa_error" in r:
            failed[r["network"], r["method"]] = failed.get((r["network"], r["method"]), 0) + 1
        else:
            groups.setdefault((r["network"], r["method"]), []).append(r)
    for (network, method), rs in groups.items():
        ours, plain = sum(r["certnet_s"] for r in rs), sum(r["certnet_plain_s"] for r in rs)
        theirs = sum(r["auto_lirpa_s"] for r in rs)
        fast = sum(r["ratio"] <= 1 / 1.5 for r in rs)
        fast_plain = sum(r["ratio_plain"] <= 1 / 1.5 for r in rs)
        lines.append(
            f"| {network} | {method} | {len(rs)} | {ours:.2f} | {plain:.2f} | {theirs:.2f} | "
            f"{ours / theirs:.2f} / {plain / theirs:.2f} | {fast} / {fast_plain} | "
            f"{sum(r['rows_proved_certnet'] for r in rs)} / "
            f"{sum(r['rows_proved_auto_lirpa'] for r in rs)} of {sum(r['rows'] for r in rs)} | "
            f"{sum(r['proved_certnet'] for r in rs)} / {sum(r['proved_auto_lirpa'] for r in rs)} | "
            f"{min(r['tighter_min'] for r in rs):.2e} .. {max(r['tighter_max'] for r in rs):.2e} | "
            f"{min(r['tighter_plain_min'] for r in rs):.2e} .. "
            f"{max(r['tighter_plain_max'] for r in rs):.2e} |")
    lines += [f"\nauto_LiRPA failed on {n} {network} {method} properties (not in the table)"
              for (network, method), n in failed.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--limit", type=int, default=None, help="properties per network")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (by default the process keeps "
                             "freed memory, as the certnet command does: certnet.memory)")
    args = parser.parse_args()
    kept = False if args.default_allocator else keep_freed_memory()
    lirpa, why = load_auto_lirpa()
    if lirpa is None:
        raise SystemExit(f"auto_LiRPA is needed (scripts/setup-auto-lirpa.sh): {why}")
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    print(f"auto_LiRPA {lirpa.__version__}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}", flush=True)
    rows = []
    for network in args.networks:
        rows.extend(bench_network(network, args.root, args.limit, args.methods, args.repeats,
                                  dtype, lirpa))
    payload = {
        "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "certnet_commit": certnet_commit(),
        "auto_lirpa": lirpa.__version__,
        "dtype": args.dtype,
        "limit": args.limit,
        "keep_freed_memory": kept,
        "auto_lirpa_alpha_options": ALPHA_OPTS,
        "setup": "VNN-COMP properties, case 0's box, all violation rows as one spec C; "
                 "certnet spec_bounds rigorous and plain vs auto_LiRPA compute_bounds (alpha: "
                 "CROWN's intermediate bounds fixed); seconds = median of repeats, sides "
                 "alternating; ratio = certnet s / auto_LiRPA s; tighter = certnet bound - "
                 "auto_LiRPA bound (positive: certnet tighter); peak memory not measured",
        "rows": rows,
    }
    write_json(args.out, payload)
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
