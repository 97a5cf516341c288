"""Print the markdown table of every ``benchmarks/results/*.json`` (pasted into the README).

    python benchmarks/table.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

print("| preset | epochs | eps | clean % | VRA % | train s/epoch | certify s/10k (sound) "
      "| sound/estimate certify time | bound/estimate | peak RSS MB | command |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(RESULTS.glob("*.json")):
    r = json.loads(path.read_text())
    print(f"| {r['preset']} | {r['epochs']} | {r['eps']:g} | {100 * r['clean_accuracy']:.2f} | "
          f"{100 * r['vra']:.2f} | {r['train_seconds_per_epoch_median']:.2f} | "
          f"{r['certify_seconds_per_10k_sound']:.2f} | {r['sound_over_estimate_time']:.2f}x | "
          f"{r['lipschitz_bound_over_estimate']:.4f} | {r['peak_rss_mb']:.0f} | "
          f"`{r['command']}` |")
