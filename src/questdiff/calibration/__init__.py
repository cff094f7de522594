"""Calibration: produces quantization parameters (never packs bits). One file per algorithm."""
from . import quest  # noqa: F401  (registers qdiffusion, quest, quest-tla, quest-cma)
from .adaround import AdaRoundConfig
from .brecq import BrecqConfig, reconstruct
from .cma import CMAConfig, run_cma
from .collect import collect_calibration
from .data import CalibrationSet, record_calibration
from .methods import Stage, StageContext, available_methods, register_method
from .quest import QuestOptions
from .sensitivity import Sensitivity, layer_sensitivity
from .tla import TLAConfig, run_tla

__all__ = [
    "AdaRoundConfig",
    "BrecqConfig",
    "CMAConfig",
    "CalibrationSet",
    "QuestOptions",
    "Sensitivity",
    "Stage",
    "StageContext",
    "TLAConfig",
    "available_methods",
    "collect_calibration",
    "layer_sensitivity",
    "reconstruct",
    "record_calibration",
    "register_method",
    "run_cma",
    "run_tla",
]
