"""Write each committed model's card, ``models/<name>/README.md``, from its checkpoint
(:func:`certnet.zoo.card_markdown`); ``tests/test_model_cards.py`` fails when one is stale.

    python scripts/model_cards.py
"""

from __future__ import annotations

from certnet.checkpoint import atomic_write
from certnet.zoo import card, card_markdown, models_dir, names

if __name__ == "__main__":
    for name in names():
        atomic_write(models_dir() / name / "README.md", card_markdown(card(name)).encode())
        print(models_dir() / name / "README.md")
