"""Preset configs as values: ``questdiff.presets.W4A4`` etc.; ``get("W6A8")`` for any other bit pair, ``W8A8_FP8``
(``get("W8A8-FP8")``) for the e4m3 grids."""
from .config import W4A4, W4A8, W8A8, W8A8_FP8, preset as get

__all__ = ["W4A4", "W4A8", "W8A8", "W8A8_FP8", "get"]
