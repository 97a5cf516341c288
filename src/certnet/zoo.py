"""Models by name, RobustBench style: every directory of the model folder (the repository's
``models/``, or ``$CERTNET_MODELS``) is a checkpoint whose name loads it
(``certnet.load("gloro-mnist-0.3-2c2f")``, ``certnet certify gloro-mnist-0.3-2c2f``), with a
model card built from its own ``config.json``: what it was trained on and how (the bundled
preset and flags that train it again), and the certified accuracy its training run measured.
The committed ``models/<name>/README.md`` files are these cards as Markdown
(``python scripts/model_cards.py``; a test keeps them equal to the checkpoints).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from certnet.checkpoint import CONFIG_FILE, load
from certnet.config import PRESETS, TrainConfig
from certnet.errors import CheckpointError

#: training-config fields that ``certnet train`` sets with a flag of the same name
FLAGS = ("method", "arch", "dataset", "eps", "epochs", "batch_size", "lr", "seed",
         "eps_train_factor", "precision", "eval_every", "eval_limit", "train_limit")
#: mapping fields set one KEY=VALUE at a time
KEY_FLAGS = {"method_kwargs": "--method-arg", "arch_kwargs": "--arch-arg"}
#: the repository's model folder, beside src/ (an editable install: ``pip install -e .``)
MODELS = Path(__file__).resolve().parents[2] / "models"


def models_dir() -> Path:
    return Path(os.environ.get("CERTNET_MODELS", MODELS))


def names() -> list[str]:
    """The checkpoints of the model folder."""
    folder = models_dir()
    return sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file()) \
        if folder.is_dir() else []


def resolve(model: str | Path) -> Path:
    """A checkpoint directory: ``model`` itself where it exists, else the model of that name."""
    path = Path(model)
    if path.exists() or str(model) not in names():
        return path
    return models_dir() / str(model)


def card(name: str) -> dict[str, Any]:
    """The model card of a named checkpoint, from its config.json (the final evaluation of
    its training run: ``last_metrics``, on ``eval_limit`` test points or all of them)."""
    path = resolve(name)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"no model named {name!r}; `certnet models` lists them")
    model = load(path)
    config = model.checkpoint_config
    train = config.get("train") or {}
    metrics = config.get("last_metrics") or {}
    return {"name": path.name, "method": config["method"], "norm": config.get("norm"),
            "dataset": config.get("dataset"), "eps": config.get("eps"),
            "certifier": model.default_certifier,
            "clean_accuracy": metrics.get("test_clean"), "certified_accuracy": metrics.get(
                "test_vra"), "test_points": train.get("eval_limit") or "all",
            "epochs": config.get("epoch"), "arch": train.get("arch"), "seed": train.get("seed"),
            "model_sha256": config["model_sha256"],
            "train_command": train_command(train, f"runs/{path.name}"),
            "fields_added_since": sorted(set(TrainConfig.__dataclass_fields__) - set(train)),
            "command": f"certnet certify {path.name}"}


def card_markdown(card: dict[str, Any]) -> str:
    """A model card (:func:`card`) as the Markdown of ``models/<name>/README.md``."""
    def pct(key: str) -> str:
        value = card[key]
        return "not recorded" if value is None else f"{100 * value:.2f}%"
    points = "all" if card["test_points"] == "all" else f"the first {card['test_points']}"
    rows = [("method", f"{card['method']} ({card['norm']})"), ("dataset", card["dataset"]),
            ("radius ε", card["eps"]), ("architecture", card["arch"]),
            ("certifier", card["certifier"]), ("clean accuracy", pct("clean_accuracy")),
            ("certified accuracy (VRA)", pct("certified_accuracy")),
            ("measured on", f"{points} test points, by the training run's last evaluation"),
            ("epochs", card["epochs"]), ("seed", card["seed"]),
            ("weights sha256", f"`{card['model_sha256']}`")]
    lines = [f"# {card['name']}", "", "Model card generated from this checkpoint's "
             "`config.json` by `python scripts/model_cards.py` (`certnet models --json` gives "
             "the same as data).", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "Certify it (any certifier that applies: `--certifier`, `--norm`):", "",
              "```bash", card["command"], "```", ""]
    if card["train_command"]:
        lines += ["Train it again (a bundled preset and flags):", "", "```bash",
                  card["train_command"], "```", ""]
        if card["fields_added_since"]:
            lines += ["Trained before these settings existed (their defaults were the "
                      f"behaviour then): {', '.join(card['fields_added_since'])}.", ""]
    return "\n".join(lines)



@functools.cache
def _presets() -> dict[str, dict[str, Any]]:
    return {p.stem: TrainConfig.from_yaml(p).to_dict() for p in sorted(PRESETS.glob("*.yaml"))}


def train_command(train: dict[str, Any], out: str) -> str | None:
    """The ``certnet train`` command (a bundled preset plus flags) whose config equals
    ``train`` (a checkpoint's training config) in every field it records, None if no preset
    gets there by flags. A field the checkpoint lacks postdates its run (its default was the
    behaviour then); where and how it runs (device, data folder) is left out."""
    best: list[str] | None = None
    for preset, config in _presets().items():
        flags = ["--config", preset]
        for key, value in config.items():
            theirs = train.get(key, value)
            if key in ("device", "data_dir") or theirs == value:
                continue
            if key in KEY_FLAGS and isinstance(theirs, dict) and set(value) <= set(theirs):
                flags += [f for k, v in theirs.items() if value.get(k) != v
                          for f in (KEY_FLAGS[key], f"{k}={json.dumps(v).strip(chr(34))}")]
            elif key in FLAGS:
                flags += [f"--{key.replace('_', '-')}", str(theirs)]
            else:
                break
        else:
            if best is None or len(flags) < len(best):
                best = flags
    return None if best is None else " ".join(["certnet train", *best, "--out", out])
