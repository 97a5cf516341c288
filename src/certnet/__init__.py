"""certnet: certifiably robust neural networks (GloRo, l_inf-dist, local Lipschitz, IBP/CROWN).

The public names are imported on first use (PEP 562), so ``import certnet`` does not import
torch: the thread count (:mod:`certnet.threads`) is chosen here, before torch (and its OpenMP
runtime) loads, for the Python API, the CLI and the tests alike.
"""

from __future__ import annotations

import importlib
from typing import Any

from certnet.threads import choose_threads

__version__ = "0.1.0"
choose_threads()

_EXPORTS = {"load": "certnet.checkpoint", "save_model": "certnet.checkpoint",
            "Certificate": "certnet.methods", "CertifiedModel": "certnet.methods",
            "GloroNet": "certnet.methods", "bounded": "certnet.any_model",
            "Bounded": "certnet.any_model"}

__all__ = ["Bounded", "Certificate", "CertifiedModel", "GloroNet", "__version__", "bounded",
           "load", "save_model"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'certnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
