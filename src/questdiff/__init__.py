"""questdiff: QuEST-style low-bit quantization of diffusion denoisers.

    import questdiff as qd
    calib = qd.collect_calibration(pipe, num_samples=64, calib_steps=20)
    pipe.unet = qd.quantize(pipe.unet, "W4A4", calib)
    qd.save(pipe.unet, "runs/w4a4")
    pipe.unet = qd.load("runs/w4a4", base=fresh_fp_unet)

The names below are imported on first use (PEP 562), so ``import questdiff`` and ``questdiff --help`` stay fast:
evaluation (torchmetrics, scipy), the zoo's training code and transformers load only when something needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr

__version__ = "0.1.0"

_SUBMODULES = ("eval", "presets", "zoo")
_ATTRIBUTES = {
    "DiffusersTransformerAdapter": "adapters",
    "DiffusersUNetAdapter": "adapters",
    "GenericAdapter": "adapters",
    "ModelAdapter": "adapters",
    "get_adapter": "adapters",
    "register_adapter": "adapters",
    "quantize": "api",
    "CalibrationSet": "calibration",
    "available_methods": "calibration",
    "collect_calibration": "calibration",
    "record_calibration": "calibration",
    "load": "checkpoint",
    "save": "checkpoint",
    "convert": "deploy",
    "load_deployed": "deploy",
    "save_deployed": "deploy",
    "ActivationSpec": "config",
    "QuantConfig": "config",
    "WeightSpec": "config",
    "at_timestep": "prepare",
    "handle": "prepare",
    "is_quantized": "prepare",
    "quant_state": "prepare",
    "set_quant_state": "prepare",
    "TimestepError": "timestep",
    "TimestepSchedule": "timestep",
}

__all__ = [  # every name resolves through __getattr__ (tests/test_cli_inputs.py checks the two lists agree)
    "ActivationSpec",
    "CalibrationSet",
    "DiffusersTransformerAdapter",
    "DiffusersUNetAdapter",
    "GenericAdapter",
    "ModelAdapter",
    "QuantConfig",
    "TimestepError",
    "TimestepSchedule",
    "WeightSpec",
    "at_timestep",
    "available_methods",
    "collect_calibration",
    "convert",
    "eval",
    "get_adapter",
    "handle",
    "is_quantized",
    "load",
    "load_deployed",
    "presets",
    "quant_state",
    "quantize",
    "record_calibration",
    "register_adapter",
    "save",
    "save_deployed",
    "set_quant_state",
    "zoo",
]

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from . import eval, presets, zoo  # noqa: A004 - questdiff.eval is the evaluation subpackage
    from .adapters import DiffusersTransformerAdapter, DiffusersUNetAdapter, GenericAdapter, ModelAdapter, get_adapter, register_adapter
    from .api import quantize
    from .calibration import CalibrationSet, available_methods, collect_calibration, record_calibration
    from .checkpoint import load, save
    from .config import ActivationSpec, QuantConfig, WeightSpec
    from .deploy import convert, load_deployed, save_deployed
    from .prepare import at_timestep, handle, is_quantized, quant_state, set_quant_state
    from .timestep import TimestepError, TimestepSchedule


__getattr__ = lazy_getattr(__name__, _ATTRIBUTES, _SUBMODULES)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
