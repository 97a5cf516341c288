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
    Certificate,
    Certifier,
    applicable,
    certify,
    get_certifier,
    register_certifier,
)

__all__ = ["CERTIFIERS", "Certificate", "Certifier", "applicable", "certify", "get_certifier",
           "register_certifier"]
