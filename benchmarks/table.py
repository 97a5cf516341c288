"""Print the markdown table of every ``benchmarks/results/*.json`` that ``gloro_mnist.py`` wrote
(pasted into the README); the other benchmarks' results there print their own tables.

    python benchmarks/table.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HEADER = ("| preset | epochs run | eps | clean % | VRA % | train s/epoch (run log / timed) "
          "| certify s/10k (sound) | sound ÷ unsound certify time | bound ÷ estimate "
          "| peak RSS MB | command |\n|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    return (f"| {r['preset']} | {r['epochs']} of {r['preset_epochs']} | {r['eps']:g} | "
            f"{100 * r['clean_accuracy']:.2f} | {100 * r['vra']:.2f} | "
            f"{r['train_seconds_per_epoch_median']:.1f} / {r['train_seconds_per_epoch_bench']:.1f}"
            f" | {r['certify_seconds_per_10k_sound']:.2f} | {r['sound_over_estimate_time']:.2f}x"
            f" | {r['lipschitz_bound_over_estimate']:.4f} | {r['peak_rss_mb']:.0f} | "
            f"`{r['command']}` |")


def main() -> None:
    print(HEADER)
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        if "preset" in result:
            print(row(result))


if __name__ == "__main__":
    main()
