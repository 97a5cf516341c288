"""certnet: certifiably robust neural networks (GloRo, l_inf-dist, local Lipschitz, IBP/CROWN).

The public names are imported on first use (PEP 562), so ``import certnet.cli`` does not import
torch: the CLI sets its thread defaults before torch (and its OpenMP runtime) loads.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {"load": "certnet.checkpoint", "save_model": "certnet.checkpoint",
            "Certificate": "certnet.methods", "CertifiedModel": "certnet.methods",
            "GloroNet": "certnet.methods"}

__all__ = ["Certificate", "CertifiedModel", "GloroNet", "__version__", "load", "save_model"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'certnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
