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
from certnet.methods.linf_dist import LinfDistNet

__all__ = ["METHODS", "Certificate", "CertifiedModel", "CrownIBPNet", "GloroNet", "IBPNet",
           "LinfDistNet", "get_method", "register_method"]
