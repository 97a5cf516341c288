"""Certifiers: a registry apart from methods; importing this package registers them all."""

from certnet.certifiers import best, bound_prop, lipschitz  # noqa: F401  (registration)
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
