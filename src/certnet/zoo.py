"""Models by name, RobustBench style: every directory of the model folder (the repository's
``models/``, or ``$CERTNET_MODELS``) is a checkpoint whose name loads it
(``certnet.load("gloro-mnist-0.3-2c2f")``, ``certnet certify gloro-mnist-0.3-2c2f``), with a
model card built from its own ``config.json``: what it was trained on and how, and the
certified accuracy its training run measured on the whole test set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from certnet.checkpoint import CONFIG_FILE, load
from certnet.errors import CheckpointError

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
            "command": f"certnet certify {path.name}"}

