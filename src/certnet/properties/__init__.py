"""VNN-LIB 1.0 properties in and out, exactly: :class:`Property` (what a file says, in exact
rationals, with float64 tensors rounded soundly for a verifier), :func:`read_vnnlib` /
:func:`write_vnnlib`, VNN-COMP result and ``instances.csv`` files, and ℓ∞ robustness
properties. Imports only :mod:`certnet.errors`, the standard library and torch."""

from .property import Box, Case, Property, Row
from .results import Instance, Result, read_instances, read_result, write_result
from .robustness import linf_robustness
from .vnnlib import format_vnnlib, parse_vnnlib, read_vnnlib, write_vnnlib

__all__ = ["Box", "Case", "Instance", "Property", "Result", "Row", "format_vnnlib",
           "linf_robustness", "parse_vnnlib", "read_instances", "read_result", "read_vnnlib",
           "write_result", "write_vnnlib"]
