"""Microbenchmarks behind `python -m fusedops bench`; one module per op family."""
from . import add, convbn, norm, optim8bit  # noqa: F401  (each registers its families)
from .harness import FAMILIES, Case, Context, Impl, Row

__all__ = ["FAMILIES", "Case", "Context", "Impl", "Row"]
