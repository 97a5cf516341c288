"""Local-Lipschitz GloRo training steps against global ones (Huang et al. 2021), side by side
in one run: median milliseconds per step of the clipped-ReLU GloRo net trained with the global
and with the local bound (batch 256, MNIST-shaped inputs in channels_last as the Trainer runs
them, Adam, the presets' settings: 5 power iterations, 2 masked ones, sparsity 0.01, eps_train
1.75), their ratio, and both again with torch.minimum / maximum / clamp in place of
certnet.nn.branchless (whose backward routes gradients without a branch per element), for that
change's speed-up. Freed memory is kept for reuse, as the ``certnet`` command keeps it.

Writes ``benchmarks/results/local_step.json`` and prints a markdown table.

    python benchmarks/local_step.py --threads 1
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from gloro_step import median_ms, step_benchmark, training_step

from certnet.archs import build_arch
from certnet.methods.gloro import GloroNet
from certnet.nn import branchless
from certnet.optim import Adam

RESULTS = Path(__file__).parent / "results" / "local_step.json"
EPS_TRAIN = 1.58 * 1.1076
TORCH_OPS = [(branchless, "minimum", torch.minimum), (branchless, "maximum", torch.maximum),
             (branchless, "clamp", torch.clamp)]


def measure(arch: str, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), generator=g)

    def run(lipschitz: str, patches: list) -> Callable[[], None]:
        kwargs = {"lipschitz": "local", "sparsity": 0.01, "local_iterations": 2} \
            if lipschitz == "local" else {}
        model = GloroNet(build_arch(arch, (1, 28, 28), 10, seed=0, activation="clipped-relu"),
                         (1, 28, 28), 10, power_iterations=5, **kwargs
                         ).to(memory_format=torch.channels_last)
        return training_step(model, Adam(model.parameters(), lr=1e-4),
                             lambda: model.loss(x, y, EPS_TRAIN)[0], tuple(patches))

    row = {"arch": arch, **median_ms({
        "global_ms": run("global", []), "local_ms": run("local", []),
        "global_ms_torch_ops": run("global", TORCH_OPS),
        "local_ms_torch_ops": run("local", TORCH_OPS)}, steps)}
    row["local_over_global"] = row["local_ms"] / row["global_ms"]
    row["branchless_speedup_global"] = row["global_ms_torch_ops"] / row["global_ms"]
    row["branchless_speedup_local"] = row["local_ms_torch_ops"] / row["local_ms"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| arch | global ms | local ms | local / global | global ms (torch min/max/clamp) "
             "| local ms (torch min/max/clamp) | branchless speed-up global / local |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['global_ms']:.1f} | {r['local_ms']:.1f} | "
                     f"{r['local_over_global']:.2f} | {r['global_ms_torch_ops']:.1f} | "
                     f"{r['local_ms_torch_ops']:.1f} | {r['branchless_speedup_global']:.2f}x / "
                     f"{r['branchless_speedup_local']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    step_benchmark(__doc__, measure, table, RESULTS, "2c2f,4c3f", 20)


if __name__ == "__main__":
    main()
