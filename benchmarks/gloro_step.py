"""One GloRo training step against the plain cross-entropy step of the same network, side by
side in one run: median milliseconds per step (batch 256, MNIST-shaped inputs in channels_last
as the Trainer runs them, Adam), the GloRo / plain ratio, steps per second, both again with
MinMax through torch.minimum / maximum (the implementation before the pair sort's own
backward) and with the pair sort's backward through torch.where (before its bitwise routing),
and the GloRo step with its power iteration's single-image convolutions on oneDNN (before they
ran without it), for the speed-up of each change. Freed memory is kept for reuse, as the
``certnet`` command keeps it (certnet.memory): with glibc's default, the medians of one
configuration moved by 10-15% between runs here.

Writes ``benchmarks/results/gloro_step.json`` and prints a markdown table.

    python benchmarks/gloro_step.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import certnet_commit, cpu_model

from certnet.archs import build_arch
from certnet.checkpoint import write_json
from certnet.memory import keep_freed_memory
from certnet.methods.gloro import GloroNet
from certnet.nn import activations, lipschitz
from certnet.nn.activations import MinMax
from certnet.optim import Adam

RESULTS = Path(__file__).parent / "results" / "gloro_step.json"
#: arch -> (eps, power iterations) of its MNIST preset.
ARCHS = {"2c2f": (0.3, 10), "4c3f": (1.58, 10)}


def torch_minmax(self: MinMax, x: torch.Tensor) -> torch.Tensor:
    """MinMax as it was computed before the pair sort (autograd through minimum / maximum)."""
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


def where_routing(swap: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The pair sort's backward as it was before its bitwise routing (torch.where)."""
    half = t.shape[1] // 2
    low, high = t[:, :half], t[:, half:]
    return torch.cat([torch.where(swap, high, low), torch.where(swap, low, high)], dim=1)


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def training_step(model: torch.nn.Module, optimizer: Adam, loss: Callable[[], torch.Tensor],
                  patches: tuple = ()) -> Callable[[], None]:
    """One timed step as the Trainer takes it (zero_grad, backward, optimizer step, the model's
    after-step projections), with ``patches`` ((owner, name, value) each) applied during it."""
    def step() -> None:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patched(*patch))
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
            model.after_step()
    return step


def median_ms(variants: dict[str, Callable[[], None]], steps: int, block: int = 5
              ) -> dict[str, float]:
    """Median ms per step of each variant: rounds of ``block`` steps of every variant in turn,
    so that the machine's drift hits them all alike; the first step of each block (caches
    just switched) is not timed."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(1, steps // block)):
        for name, step in variants.items():
            step()
            for _ in range(block):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure(arch: str, steps: int) -> dict:
    eps, iterations = ARCHS[arch]
    model = GloroNet(build_arch(arch, (1, 28, 28), 10), (1, 28, 28), 10,
                     power_iterations=iterations).to(memory_format=torch.channels_last)
    optimizer = Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), generator=g)

    def run(loss: Callable[[], torch.Tensor], *patches: tuple) -> Callable[[], None]:
        return training_step(model, optimizer, loss, patches)

    def plain() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def gloro() -> torch.Tensor:
        return model.loss(x, y, eps)[0]

    old_minmax = (MinMax, "forward", torch_minmax)
    where = (activations, "_swap_where", where_routing)
    onednn = (lipschitz, "without_onednn", contextlib.nullcontext)
    row = {"arch": arch, **median_ms({
        "plain_ms": run(plain), "gloro_ms": run(gloro),
        "plain_ms_torch_minmax": run(plain, old_minmax),
        "gloro_ms_torch_minmax": run(gloro, old_minmax),
        "plain_ms_where_routing": run(plain, where),
        "gloro_ms_where_routing": run(gloro, where),
        "gloro_ms_onednn_power_iteration": run(gloro, onednn)}, steps)}
    row["gloro_over_plain"] = row["gloro_ms"] / row["plain_ms"]
    row["steps_per_s_gloro"] = 1000 / row["gloro_ms"]
    row["pair_sort_speedup_plain"] = row["plain_ms_torch_minmax"] / row["plain_ms"]
    row["pair_sort_speedup_gloro"] = row["gloro_ms_torch_minmax"] / row["gloro_ms"]
    row["bitwise_routing_speedup_plain"] = row["plain_ms_where_routing"] / row["plain_ms"]
    row["bitwise_routing_speedup_gloro"] = row["gloro_ms_where_routing"] / row["gloro_ms"]
    row["power_iteration_speedup"] = row["gloro_ms_onednn_power_iteration"] / row["gloro_ms"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| arch | plain ms | GloRo ms | GloRo / plain | GloRo steps/s | plain ms (torch "
             "MinMax) | GloRo ms (torch MinMax) | plain ms (where routing) | GloRo ms (where "
             "routing) | GloRo ms (power iteration on oneDNN) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['plain_ms']:.1f} | {r['gloro_ms']:.1f} | "
                     f"{r['gloro_over_plain']:.2f} | {r['steps_per_s_gloro']:.1f} | "
                     f"{r['plain_ms_torch_minmax']:.1f} | {r['gloro_ms_torch_minmax']:.1f} | "
                     f"{r['plain_ms_where_routing']:.1f} | {r['gloro_ms_where_routing']:.1f} | "
                     f"{r['gloro_ms_onednn_power_iteration']:.1f} |")
    return "\n".join(lines)


def step_benchmark(doc: str, measure: Callable[[str, int], dict],
                   table: Callable[[list[dict]], str], results: Path, archs: str,
                   steps: int) -> None:
    """The command line of a step benchmark: --threads, --steps, --archs; one row per arch,
    written to ``results`` with the machine and command, and printed as a table."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=steps,
                        help="timed steps per variant, in rounds of blocks")
    parser.add_argument("--archs", default=archs)
    args = parser.parse_args()
    keep_freed_memory()  # as the certnet command does: steps without page faults, steadier
    torch.set_num_threads(args.threads)
    rows = [measure(arch, args.steps) for arch in args.archs.split(",")]
    write_json(results, {"rows": rows, "batch": 256, "threads": args.threads,
                         "machine": cpu_model(), "torch": torch.__version__,
                         "commit": certnet_commit(), "command": "python " + " ".join(sys.argv)})
    print(table(rows))


def main() -> None:
    step_benchmark(__doc__, measure, table, RESULTS, ",".join(ARCHS), 30)


if __name__ == "__main__":
    main()
