"""Certifiers: a registry apart from methods; importing this package registers them all."""

from certnet.certifiers import (  # noqa: F401  (registration)
    best,
    bound_prop,
    linf_lipschitz,
    lipschitz,
    local_lipschitz,
)
from certnet.certifiers.base import (
    CERTIFIERS,
    Certifiable,
    Certificate,
    Certifier,
    applicable,
    certify,
    register_certifier,
)

__all__ = ["CERTIFIERS", "Certifiable", "Certificate", "Certifier", "applicable", "certify",
           "register_certifier"]
