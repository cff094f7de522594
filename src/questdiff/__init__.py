"""questdiff: QuEST-style low-bit quantization of diffusion denoisers.

    import questdiff as qd
    calib = qd.collect_calibration(pipe, num_samples=64, calib_steps=20)
    pipe.unet = qd.quantize(pipe.unet, "W4A4", calib)
    qd.save(pipe.unet, "runs/w4a4")
    pipe.unet = qd.load("runs/w4a4", base=fresh_fp_unet)
"""
__version__ = "0.1.0"

from . import eval, presets, zoo  # noqa: A004 - questdiff.eval is the evaluation subpackage
from .adapters import DiffusersTransformerAdapter, DiffusersUNetAdapter, GenericAdapter, ModelAdapter, get_adapter, register_adapter
from .api import quantize
from .calibration import CalibrationSet, available_methods, collect_calibration, record_calibration
from .checkpoint import load, save
from .config import ActivationSpec, QuantConfig, WeightSpec
from .deploy import convert, load_deployed, save_deployed
from .prepare import at_timestep, handle, is_quantized, quant_state, set_quant_state
from .timestep import TimestepError, TimestepSchedule

__all__ = [
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
