"""Certification methods; importing this package registers them all."""

from certnet.methods.base import (
    METHODS,
    Certificate,
    CertifiedModel,
    get_method,
    register_method,
)
from certnet.methods.bound_prop import CrownIBPNet, IBPNet
from certnet.methods.gloro import GloroNet

__all__ = ["METHODS", "Certificate", "CertifiedModel", "CrownIBPNet", "GloroNet", "IBPNet",
           "get_method", "register_method"]
