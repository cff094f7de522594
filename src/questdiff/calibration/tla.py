"""TLA, temporal layer alignment (paper §3.3.2, code ``pd_optimize_timeembed``, spec §2.8 stage A).

Finetunes the weights and biases of the time-embedding layers and the active row of their input-activation
scales against the FP teacher, with a local MSE on those layers' outputs plus the global MSE on the denoiser
output. Every other parameter stays bit-identical.

Defaults and the paper-vs-code choice each one takes:
- ``roles=("time_proj",)``: the code trains only each ResBlock's ``emb_layers.1``; the paper also counts the
  time-embedding MLP (``("time_embed", "time_proj")``).
- ``weight_lr=1e-5`` (paper = code).
- ``act_lr=1e-4``: the paper's value; the code uses 1e-5 in TLA (``act_lr=1e-5`` reproduces it). Measured on a
  small MNIST DDPM trained for this (16x16 UNet2DModel with attention, DDIM 50 steps, 10 calibrated timesteps, 48
  rows each, after Q-Diffusion calibration, 200 epochs): held-out TLA loss 0.0090 (1e-4) vs 0.0093 (1e-5) at W4A8
  and 0.0136 vs 0.0166 at W4A4 (0.050 / 0.052 before TLA); PSNR of samples vs the FP samples of the same seeds
  25.60 vs 25.50 dB and 21.70 vs 21.61 dB. At 50 epochs the two were even (W4A4: 1e-5 better).
- ``epochs=200`` passes over ``samples_per_t=8`` rows per timestep (code: 200 LSUN / 300 ImageNet; SD 2 rows).
- ``batch_size=2``: the code's micro-batch 1 with 2-sample gradient accumulation is the same gradient as a batch of
  2, so the step count and gradients match the code. Larger batches run faster (fewer, fuller steps) but, at the same
  lr, move less: on the MNIST DDPM above, batch 8 x 200 epochs (a quarter of the steps) reached held-out TLA loss
  0.0095 / 0.0164 and PSNR 25.17 / 21.47 dB (W4A8 / W4A4) against 0.0090 / 0.0136 and 25.60 / 21.70 dB at batch 2.
- loss: ``"paper"`` (Eq. 7): ``local_weight * sum_k MSE_k + global_weight * MSE_out`` with 1 and 2; ``"code"``:
  ``sum_k MSE_k + N_hooked * MSE_out``. ``global_loss=False`` drops the global term (Table 7 ablation).
- ``order="shuffled"``: timesteps in a fresh random order every epoch; the code runs all epochs of one timestep
  before the next (``"timestep_major"``), which biases the shared weights towards the last timesteps (spec §2.8).
  ``"mixed"`` puts every timestep in each batch (``batch_size`` rows per timestep per step, one step per chunk): a
  GPU runs a batch of T*batch_size rows in about the time of one small batch, so the same epochs take ~T x fewer
  forwards.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adapters import TIME_EMBEDDING_ROLES, LayerInfo, ModelAdapter, roles_example
from ..config import check_types
from ..prepare import handle, quant_layers
from .common import generator, layers_with_roles
from .data import CalibrationSet
from .finetune import (
    ORDERS,
    Batch,
    FinetuneResult,
    Objective,
    Order,
    evaluate,
    evaluation_batches,
    finetune,
    plan_batches,
)

logger = logging.getLogger(__name__)

LossVariant = Literal["paper", "code"]


@dataclass(frozen=True)
class TLAConfig:
    """TLA settings (see the module docstring for the paper/code choice of each default).

    Attributes:
        roles: time-embedding roles whose layers train (subset of ``("time_embed", "time_proj")``).
        weight_lr / act_lr: Adam learning rates of weights+biases and of the activation-scale rows.
        epochs: passes over each timestep's rows; samples_per_t: rows per timestep (drawn once).
        batch_size: rows per step (all of one timestep), or per timestep per step with ``order="mixed"``.
        local_weight / global_weight: lambda_TLA and lambda_G of Eq. 7 (``loss="paper"``).
        loss: ``"paper"`` or ``"code"`` (``N_hooked`` x global, local weight 1).
        global_loss: include the global output term.
        order: ``"shuffled"`` (default), ``"sequential"``, ``"timestep_major"`` (code) or ``"mixed"``.
        timesteps: train only these calibrated timesteps (default: all).
        autocast: bf16 autocast on CUDA (off by default: bf16 rounding before an 8-bit quantizer changes results).
        cache_teacher: keep the teacher's outputs of the fixed rows in memory instead of recomputing them.
    """

    roles: tuple[str, ...] = ("time_proj",)
    weight_lr: float = 1e-5
    act_lr: float = 1e-4
    epochs: int = 200
    samples_per_t: int = 8
    batch_size: int = 2
    local_weight: float = 1.0
    global_weight: float = 2.0
    loss: LossVariant = "paper"
    global_loss: bool = True
    order: Order = "shuffled"
    timesteps: tuple[float, ...] | None = None
    autocast: bool = False
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.roles, list):
            object.__setattr__(self, "roles", tuple(self.roles))
        if isinstance(self.timesteps, list):
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
        check_types(self)
        bad = [r for r in self.roles if r not in TIME_EMBEDDING_ROLES]
        if not self.roles or bad:
            raise ValueError(f"TLA roles must be a non-empty subset of {TIME_EMBEDDING_ROLES} (got {self.roles}); "
                             "use ('time_proj',) (code) or ('time_embed', 'time_proj') (paper)")
        if self.weight_lr <= 0 or self.act_lr <= 0:
            raise ValueError("TLA learning rates must be > 0 (code: weight 1e-5, act 1e-5; paper act 1e-4)")
        if self.epochs < 0 or self.samples_per_t < 1 or self.batch_size < 1:
            raise ValueError("TLA needs epochs >= 0, samples_per_t >= 1 and batch_size >= 1")
        if self.loss not in ("paper", "code") or self.order not in ORDERS:
            raise ValueError(f"TLA loss must be 'paper' or 'code' and order one of {ORDERS}")
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))


def check_tla_roles(model: nn.Module, adapter: ModelAdapter, layers: Mapping[str, LayerInfo], config: TLAConfig) -> None:
    """Raise naming the fix if no layer plays the roles TLA trains (``layers``: the adapter's roles of ``model``)."""
    if any(info.has_role(config.roles) for info in layers.values()):
        return
    other = [r for r in TIME_EMBEDDING_ROLES if r not in config.roles and any(i.has_role((r,)) for i in layers.values())]
    alternative = f", or train those: tla=TLAConfig(roles={tuple(other)})" if other else ""
    raise ValueError(
        f"TLA trains the time-embedding layers (roles {config.roles}) but no layer of {type(model).__name__} plays them: "
        f"name them, e.g. {roles_example(adapter, TIME_EMBEDDING_ROLES)} (time_embed: the timestep MLP, time_proj: the "
        f"per-block projections of its output){alternative}; or use a method without TLA (quest-cma, qdiffusion)"
    )


def tla_objective(model: nn.Module, config: TLAConfig) -> Objective:
    """The layers, scales and loss weights TLA trains on ``model``."""
    h = handle(model)
    check_tla_roles(model, h.adapter, h.layers, config)
    names = layers_with_roles(model, config.roles)
    layers = quant_layers(model)
    quantizer_names = {id(q): n for n, q in model.named_modules()}
    scales = {quantizer_names[id(q)]: q for n in names for q in layers[n].act_quantizers()}
    global_weight = (len(names) if config.loss == "code" else config.global_weight) if config.global_loss else 0.0
    return Objective(names, scales, names, config.local_weight, global_weight)


def tla_plan(model: nn.Module, calib: CalibrationSet, config: TLAConfig, seed: int = 0) -> list[Batch]:
    """TLA's training batches (``run_tla`` draws the same ones for the same ``seed``)."""
    return plan_batches(model, calib, samples_per_t=config.samples_per_t, epochs=config.epochs, batch_size=config.batch_size,
                        resample=False, order=config.order, generator=generator(seed, 21), timesteps=config.timesteps)


def run_tla(
    model: nn.Module,
    calib: CalibrationSet,
    config: TLAConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> FinetuneResult:
    """Temporal layer alignment of a prepared, calibrated ``model`` (weights and activations initialised).

    Returns the per-step losses and the TLA loss on its rows before and after."""
    config = config or TLAConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    objective = tla_objective(model, config)
    plan = tla_plan(model, calib, config, seed)
    rows = evaluation_batches(model, calib, config.samples_per_t, config.batch_size, generator(seed, 21), config.timesteps,
                              mixed=config.order == "mixed")  # the plan's own rows
    result = FinetuneResult()
    result.loss_before = evaluate(model, calib, objective, rows, device=device, use_autocast=config.autocast)
    result.losses = finetune(model, calib, objective, plan, weight_lr=config.weight_lr, act_lr=config.act_lr, device=device,
                             use_autocast=config.autocast, cache_teacher=config.cache_teacher, progress=progress, desc="TLA")
    result.loss_after = evaluate(model, calib, objective, rows, device=device, use_autocast=config.autocast)
    logger.info("TLA on %d layers over %d timesteps: loss %.4g -> %.4g (%d steps)", len(objective.weight_layers),
                len(handle(model).schedule), result.loss_before, result.loss_after, len(result.losses))
    return result
