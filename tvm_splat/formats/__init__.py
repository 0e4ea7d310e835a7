"""Sparse attention formats: pattern descriptions and the ACSR storage format.

Pure data and numpy; no TVM or torch needed. See ``acsr.py`` for the layout kernels read.
"""
from .acsr import ACSR
from .geometry import KINDS, Geometry
from .patterns import (BlockLocal, Dense, DilatedWindow, GlobalTokens, Pattern, PerHead,
                       Strided, Union, Window, parse_pattern)
from .runs import Run, RunTable

__all__ = [
    "ACSR",
    "Geometry",
    "KINDS",
    "Pattern",
    "Dense",
    "Window",
    "DilatedWindow",
    "Strided",
    "BlockLocal",
    "GlobalTokens",
    "Union",
    "PerHead",
    "parse_pattern",
    "Run",
    "RunTable",
]
