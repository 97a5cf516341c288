"""Speed of the bounds engine (certnet.bounds) against auto_LiRPA, side by side in one process.

For DM-small and DM-medium at MNIST shape (random weights with the IBP initialisation, a fixed
synthetic batch in [0, 1]), l_inf eps 0.1, float32: the wall seconds (median of ``--repeats``;
the two libraries alternate, so they share the machine's load alike) of the margin lower bounds
z_y - z_j by IBP, CROWN-IBP and full CROWN (no grad), and of IBP and CROWN-IBP training steps
(clean forward pass, bounds, loss, ``loss.backward()``), with auto_LiRPA computing the same
bounds (``compute_bounds`` with method "IBP", "CROWN-IBP", "CROWN" and the same margin
specification C = e_y - e_j), and a CROWN-IBP training step with loss fusion (Xu et al. 2020:
the robust CE bounded with one backward pass; certnet's ``fused_training_loss``, auto_LiRPA's
``CrossEntropyWrapper`` with ``loss_fusion``; the rows compare log of the bound on
sum_j exp(z_j - z_y)). Given the labels, neither side's IBP or CROWN-IBP bound rows
run the clean forward pass (certnet's full CROWN does). Reports
the largest |certnet - auto_LiRPA| bound difference (IBP and CROWN-IBP should agree to float32
rounding; certnet's full CROWN tightens its intermediate intervals by IBP as well, so it should
be at least as tight: "tighter by" is the largest amount by which it is).

Writes ``benchmarks/results/bounds/bounds_speed.json`` (machine, torch, threads, commit) and
prints a markdown table; ratio = certnet s / auto_LiRPA s (below 1: certnet faster).

    OMP_NUM_THREADS=1 python benchmarks/bounds_speed.py [--batch 256] [--repeats 3]

auto_LiRPA is optional (not a certnet dependency): without it the auto_LiRPA columns are empty.
``scripts/setup-auto-lirpa.sh`` builds ``.venv-auto-lirpa`` with certnet and auto_LiRPA 0.3 (the
newest on the package index here; numpy < 2, torch.onnx imports bridged below); run this script
with that environment's python.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import certnet_commit, cpu_model
from torch import nn

from certnet.archs import build_arch
from certnet.bounds import fused_training_loss, margin_bounds, margin_spec, training_bounds
from certnet.bounds.rules.affine import ConvRule
from certnet.checkpoint import write_json
from certnet.memory import keep_freed_memory
from certnet.threat import ThreatModel

OUT = Path(__file__).parent / "results" / "bounds" / "bounds_speed.json"
MODELS = ("dm-small", "dm-medium")
#: row label -> (certnet margin_bounds method, auto_LiRPA compute_bounds method)
METHODS = {"IBP": ("ibp", "IBP"), "CROWN-IBP": ("crown-ibp", "CROWN-IBP"),
           "CROWN": ("crown", "CROWN")}
#: training-step row label -> (CROWN-IBP beta, auto_LiRPA method)
TRAIN = {"IBP train step": (0.0, "IBP"), "CROWN-IBP train step": (1.0, "CROWN-IBP")}
FUSED = "CROWN-IBP fused train step"






def bridge_old_onnx_imports() -> None:
    """Put back the three torch.onnx internals auto_LiRPA <= 0.3 imports, which torch 2.x moved
    to torch.onnx._internal.torchscript_exporter (same functions; nothing else is changed)."""
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper as moved_helper
        from torch.onnx._internal.torchscript_exporter import utils as moved_utils
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # an older torch: nothing moved
        return
    import torch.onnx.symbolic_helper as helper
    import torch.onnx.utils as utils

    def set_opset_version(version: int) -> None:
        GLOBALS.export_onnx_opset_version = version

    utils.__dict__.setdefault("_optimize_graph", moved_utils._optimize_graph)
    helper.__dict__.setdefault("_set_opset_version", set_opset_version)
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = moved_helper._node_get


def bridge_named_members(lirpa) -> None:
    """auto_LiRPA 0.3's ``BoundedModule._named_members`` predates torch's ``remove_duplicate``
    argument, which ``parameters()`` passes (its sparse intermediate bounds call it): accept it
    (the override always removes duplicates, torch's default)."""
    own = lirpa.BoundedModule._named_members

    def named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return own(self, get_members_fn, prefix, recurse)

    lirpa.BoundedModule._named_members = named_members


def load_auto_lirpa():
    """The auto_LiRPA module, or (None, why) when it cannot be imported."""
    try:
        bridge_old_onnx_imports()
        import auto_LiRPA  # noqa: PLC0415
    except Exception as err:  # not installed, or broken by its own dependencies
        return None, f"{type(err).__name__}: {err}"
    bridge_named_members(auto_LiRPA)
    return auto_LiRPA, None


def plain_copy(layers: nn.Sequential) -> nn.Sequential:
    """The same function with stock torch layers (auto_LiRPA traces standard modules; certnet's
    Lipschitz layers are bounded with their effective weights, copied here)."""
    out = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            w = ConvRule.weight(m).detach()
            conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=m.stride,
                             padding=m.padding, bias=m.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(w)
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            out.append(conv)
        elif isinstance(m, nn.Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            out.append(lin)
        elif type(m) in (nn.ReLU, nn.Flatten):
            out.append(type(m)())
        else:
            raise SystemExit(f"no plain copy for {type(m).__name__}")
    return nn.Sequential(*out)


class ExpSumWrapper(nn.Module):
    """auto_LiRPA's CrossEntropyWrapper (sum_j exp(z_j - z_y)) with the label as a one-hot
    input: torch 2.x exports its gather as onnx::OneHot, which auto_LiRPA 0.3 cannot bound."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.exp(z - (z * onehot).sum(-1, keepdim=True)).sum(-1, keepdim=True)


def training_loss(logits: torch.Tensor, y: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Zhang et al. 2020's loss at kappa 1/2: CE of the clean logits plus the robust CE of the
    logits [0, -lower] (so both sides run the clean forward pass a training step needs)."""
    robust = torch.cat([lower.new_zeros(len(lower), 1), -lower], dim=1)
    zeros = lower.new_zeros(len(lower), dtype=torch.long)
    return F.cross_entropy(logits, y) + F.cross_entropy(robust, zeros)


def unless_out_of_memory(fn) -> tuple[object, str | None]:
    """(fn(), None), or (None, why) if fn runs out of memory: the address-space limit set in
    main turns what would be the kernel's OOM kill of this process into an exception."""
    try:
        return fn(), None
    except (MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower():
            raise
        return None, f"out of memory ({type(err).__name__})"


def median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    runs, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs, result


def bench_model(name: str, batch: int, eps: float, repeats: int, crown_repeats: int,
                methods: list[str], lirpa) -> list[dict]:
    torch.manual_seed(0)
    layers = build_arch(name, (1, 28, 28), 10, seed=0, init="ibp")
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    threat = ThreatModel("linf", eps)
    spec = margin_spec(y, 10)
    bounded = bx = None
    if lirpa is not None:
        plain = plain_copy(layers)
        with torch.no_grad():
            assert torch.allclose(plain(x), layers(x), atol=1e-5), "plain copy differs"
        bounded = lirpa.BoundedModule(plain, torch.zeros(1, 1, 28, 28), device="cpu")
        # collected by hand: auto_LiRPA 0.3's parameters() fails on torch 2.x
        lirpa_params = [p for m in bounded.modules() for p in m._parameters.values()
                        if p is not None]
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps,
                                       x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
        bx = lirpa.BoundedTensor(x, ptb)

    def lirpa_bounds(method: str) -> torch.Tensor:
        lb, _ = bounded.compute_bounds(x=(bx,), C=spec, method=method, bound_upper=False)
        return lb

    fused = None
    if lirpa is not None and FUSED in methods:
        onehot = F.one_hot(y, 10).to(x.dtype)
        fused = lirpa.BoundedModule(ExpSumWrapper(plain), (x[:1], onehot[:1]),
                                    bound_opts={"loss_fusion": True}, device="cpu")
        fused_params = [p for m in fused.modules() for p in m._parameters.values()
                        if p is not None]
        exp_node = next(m for m in fused.modules() if type(m).__name__ == "BoundExp")

    rows = []
    for label in methods:
        reps = crown_repeats if label == "CROWN" else repeats
        row = {"model": name, "method": label, "batch": batch, "eps": eps, "repeats": reps}
        if label == FUSED:
            def ours():
                layers.zero_grad()
                bound, _, logits = fused_training_loss(layers, x, threat, y, 1.0)
                (F.cross_entropy(logits, y) + bound.mean()).backward()
                return bound.detach().unsqueeze(1)

            def theirs():
                for p in fused_params:
                    p.grad = None
                # its exp node works relative to a per-point max_input, added back to the log
                clean = torch.log(fused(x, onehot)).squeeze(1) + exp_node.max_input.view(-1)
                _, upper = fused.compute_bounds(x=(bx, onehot), C=None, method="CROWN-IBP",
                                                bound_lower=False, bound_upper=True)
                bound = torch.log(upper).squeeze(1) + exp_node.max_input.view(-1)
                (clean.mean() + bound.mean()).backward()
                return bound.detach().unsqueeze(1)
            grad_mode = torch.enable_grad
        elif label in TRAIN:
            beta, their_method = TRAIN[label]

            def ours(beta=beta):
                layers.zero_grad()
                lower, logits = training_bounds(layers, x, threat, y, beta)
                training_loss(logits, y, lower).backward()
                return lower.detach()

            def theirs(their_method=their_method):
                for p in lirpa_params:
                    p.grad = None
                logits = bounded(x)
                lower = lirpa_bounds(their_method)
                training_loss(logits, y, lower).backward()
                return lower.detach()
            grad_mode = torch.enable_grad
        else:
            ours_method, their_method = METHODS[label]

            def ours(ours_method=ours_method):
                return margin_bounds(layers, x, threat, y, ours_method)

            def theirs(their_method=their_method):
                return lirpa_bounds(their_method)
            grad_mode = torch.no_grad
        failed = None  # auto_LiRPA's out-of-memory error, if it hits the address-space limit
        with grad_mode():
            if reps > 1:  # one untimed warm-up each
                ours()
                if bounded is not None:
                    _, failed = unless_out_of_memory(theirs)
            times_ours, times_theirs, mine, other = [], [], None, None
            for _ in range(reps):  # alternate, so both see the same machine load
                _, [t], mine = median_seconds(ours, 1)
                times_ours.append(t)
                if bounded is not None and failed is None:
                    timed, failed = unless_out_of_memory(lambda: median_seconds(theirs, 1))
                    if failed is None:
                        _, [t], other = timed
                        times_theirs.append(t)
        row["certnet_s"] = statistics.median(times_ours)
        row["certnet_runs"] = times_ours
        if failed is not None:
            row["auto_lirpa_error"] = failed
        elif bounded is not None:
            row["auto_lirpa_s"] = statistics.median(times_theirs)
            row["auto_lirpa_runs"] = times_theirs
            row["ratio"] = row["certnet_s"] / row["auto_lirpa_s"]
            diff = mine.double() - other.double()
            if label == FUSED:  # upper bounds there: the lower one is the tighter
                diff = -diff
            row["max_abs_bound_diff"] = float(diff.abs().max())
            row["certnet_tighter_by"] = float(diff.max())
            row["certnet_looser_by"] = float((-diff).max())
        row["mean_certnet_bound"] = float(mine.mean())
        rows.append(row)
        theirs_note = "" if bounded is None else f", auto_LiRPA {failed}" if failed else \
            f", auto_LiRPA {row['auto_lirpa_s']:.3f} s"
        print(f"  {name} {label}: certnet {row['certnet_s']:.3f} s{theirs_note}", flush=True)
    return rows


def fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| model | method | certnet s | auto_LiRPA s | ratio (certnet / auto_LiRPA) "
             "| max \\|bound diff\\| |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {fmt(r['certnet_s'])} | "
                     f"{r.get('auto_lirpa_error') or fmt(r.get('auto_lirpa_s'))} | "
                     f"{fmt(r.get('ratio'), '.2f')} | "
                     f"{fmt(r.get('max_abs_bound_diff'), '.2e')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *TRAIN, FUSED],
                        choices=[*METHODS, *TRAIN, FUSED])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crown-repeats", type=int, default=1,
                        help="repeats of full CROWN (slow; no warm-up run when 1)")
    parser.add_argument("--no-auto-lirpa", action="store_true",
                        help="time certnet alone even if auto_LiRPA is installed")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the process, as the certnet command does "
                        "(certnet.memory)")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="address-space limit of this process, so that a side running out "
                        "of memory fails with an error that is reported instead of the kernel "
                        "killing the benchmark (0: none)")
    args = parser.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this allocator does not take the settings")
    if args.memory_limit_gb > 0:
        limit = int(args.memory_limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    lirpa, why = (None, "--no-auto-lirpa") if args.no_auto_lirpa else load_auto_lirpa()
    print(f"auto_LiRPA: {getattr(lirpa, '__version__', None) or 'not used (' + why + ')'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, args.batch, args.eps, args.repeats, args.crown_repeats,
                                args.methods, lirpa))
    payload = {
        "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "certnet_commit": certnet_commit(),
        "auto_lirpa": getattr(lirpa, "__version__", None),
        "auto_lirpa_missing": why,
        "memory_limit_gb": args.memory_limit_gb,
        "keep_freed_memory": args.keep_freed_memory,
        "setup": "random weights (IBP init, seed 0), synthetic inputs torch.rand (seed 1), "
                 "labels seed 2, l_inf eps, float32; ratio = certnet s / auto_LiRPA s",
        "rows": rows,
    }
    write_json(args.out, payload)
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
