"""The committed model cards (``models/<name>/README.md``) are their checkpoints' cards, and
each card's training command rebuilds the checkpoint's recorded training config."""

from __future__ import annotations

import shlex

import pytest
import yaml

from certnet.checkpoint import read_config
from certnet.config import TrainConfig
from certnet.zoo import KEY_FLAGS, PRESETS, card, card_markdown, models_dir, names, train_command


@pytest.fixture(scope="module")
def cards() -> dict[str, dict]:
    return {name: card(name) for name in names()}


@pytest.mark.parametrize("name", names())
def test_committed_card_is_the_checkpoints(name, cards):
    written = (models_dir() / name / "README.md").read_text()
    assert written == card_markdown(cards[name]), \
        f"models/{name}/README.md is stale: run python scripts/model_cards.py"


def _config_of(command: str) -> dict:
    """The training config ``certnet train`` builds from ``command``: the preset, then each
    flag (as cmd_train applies them)."""
    words = shlex.split(command)
    assert words[:2] == ["certnet", "train"]
    pairs = list(zip(words[2::2], words[3::2], strict=True))
    config = TrainConfig.from_yaml(PRESETS / f"{dict(pairs)['--config']}.yaml").to_dict()
    fields = {flag: field for field, flag in KEY_FLAGS.items()}
    for flag, value in pairs:
        key = flag.removeprefix("--").replace("-", "_")
        if flag in fields:
            k, _, v = value.partition("=")
            config[fields[flag]] = {**config[fields[flag]], k: yaml.safe_load(v)}
        elif key in config:
            config[key] = yaml.safe_load(value)
    return config


@pytest.mark.parametrize("name", names())
def test_train_command_rebuilds_the_recorded_config(name, cards):
    recorded = read_config(models_dir() / name)["train"]
    command = cards[name]["train_command"]
    assert command is not None
    rebuilt = _config_of(command)
    assert {k: rebuilt[k] for k in recorded if k not in ("device", "data_dir")} == \
        {k: v for k, v in recorded.items() if k not in ("device", "data_dir")}


def test_no_preset_gives_none_and_flags_are_minimal():
    base = TrainConfig.from_yaml(PRESETS / "gloro-mnist-0.3-2c2f.yaml").to_dict()
    assert train_command({**base, "seed": 7}, "runs/x") == \
        "certnet train --config gloro-mnist-0.3-2c2f --seed 7 --out runs/x"
    assert train_command({**base, "weight_decay": 0.5}, "runs/x") is None  # no such flag
