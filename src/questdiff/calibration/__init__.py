"""Calibration: produces quantization parameters (never packs bits). One file per algorithm."""
from .collect import collect_calibration
from .data import CalibrationSet, record_calibration
from .methods import Stage, StageContext, available_methods, register_method

__all__ = [
    "CalibrationSet",
    "Stage",
    "StageContext",
    "available_methods",
    "collect_calibration",
    "record_calibration",
    "register_method",
]
