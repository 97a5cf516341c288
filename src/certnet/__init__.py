"""certnet: certifiably robust neural networks (GloRo, l_inf-dist, local Lipschitz, IBP/CROWN)."""

__version__ = "0.1.0"

from certnet.checkpoint import load, save_model  # noqa: E402
from certnet.methods import Certificate, CertifiedModel, GloroNet  # noqa: E402

__all__ = ["Certificate", "CertifiedModel", "GloroNet", "__version__", "load", "save_model"]
