"""Microbenchmarks behind `python -m fusedops bench`; one module per op family."""
from . import add  # noqa: F401  (registers its families)
from . import norm  # noqa: F401
from .harness import FAMILIES, Case, Context, Impl, Row

__all__ = ["FAMILIES", "Case", "Context", "Impl", "Row"]
