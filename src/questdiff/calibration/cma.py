"""CMA, critical module alignment with the global loss (paper §3.3.3-3.3.4, code ``pd_optimize_timewise``, spec
§2.8 stage B).

Finetunes the weights and biases of the "critical" layers and the active row of EVERY activation scale except
the time-embedding layers' (those belong to TLA), against the FP teacher over all timesteps.

Critical layers (``critical``):
- ``"auto"`` picks the code's per-family lists by what the model conditions on (``detect_family``: its
  cross-attention context, or its conditioning inputs and ``cond`` layers):
  unconditional UNets with self-attention (LSUN-like): q, k, v of self-attention (the code's ``qkv``);
  class-conditional with cross-attention to one token (ImageNet-like): ``ff``, self/cross q, self k and v;
  text-conditional (SD-like): ``ff``;
- a tuple of adapter roles;
- ``"sensitivity"``: the ``top_k`` layers ranked by ``sensitivity.layer_sensitivity`` at ``sensitivity_bits``.

Defaults: weight lr 1e-5 and act lr 1e-4 (paper = code); 20 epochs of 64 fresh rows per (epoch, timestep) in
batches of 4 (the code's micro-batch 1 x 4-step accumulation, i.e. the same 16 steps per visit); loss ``"paper"``
(``local_weight * sum_k MSE_k + global_weight * MSE_out``, 1 and 2); ``"code"`` is ``N_hooked * MSE_out`` plus the
local terms only for text models. The code resets the scale optimizer for every (epoch, t) visit
(``reset_act_state=True``); the default keeps one Adam state per scale row.

Measured caution (small MNIST DDPM, 16x16, DDIM 50 steps, 10 calibrated timesteps, CPU): after TLA, 5 CMA epochs
lowered the CMA loss (W4A8 0.076 -> 0.062) and the held-out single-step output MSE (0.00163 -> 0.00152), yet the
PSNR of samples against the FP samples dropped (25.59 -> 25.15 dB; W4A4 21.60 -> 21.29); the code's loss
(``N_hooked`` x global only) lowered the step MSE most (0.00142) and the PSNR most (24.27). The mean (bias) of the
output error at the uncalibrated sampler steps grew. Check CMA on the target model's sample quality.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adapters import TIME_EMBEDDING_ROLES, LayerInfo, ModelAdapter, roles_example
from ..config import check_types
from ..nn import ActQuantizer
from ..prepare import handle, is_quantized, quant_layers, quant_state
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
from .sensitivity import layer_sensitivity

logger = logging.getLogger(__name__)

Family = Literal["unconditional", "class", "text"]
CRITICAL_ROLES: dict[str, tuple[str, ...]] = {
    "unconditional": ("attn.self.q", "attn.self.k", "attn.self.v"),
    "class": ("ff", "attn.self.q", "attn.cross.q", "attn.self.k", "attn.self.v"),
    "text": ("ff",),
}


@dataclass(frozen=True)
class CMAConfig:
    """CMA settings (see the module docstring for the paper/code choice of each default).

    Attributes:
        critical: ``"auto"``, ``"sensitivity"`` or a tuple of adapter roles.
        top_k / sensitivity_bits / sensitivity_samples: layer count, probe bits and rows per timestep for
            ``critical="sensitivity"``.
        weight_lr / act_lr: Adam learning rates of weights+biases and of the activation-scale rows.
        epochs: sweeps over the timesteps; samples_per_t: fresh rows per (epoch, timestep); batch_size: rows per step.
        local_weight / global_weight: lambda_CMA and lambda_G of Eq. 7 (``loss="paper"``).
        loss: ``"paper"`` or ``"code"``; global_loss: include the global output term.
        order: ``"shuffled"`` (default), ``"sequential"`` (code: noisiest first every epoch) or ``"mixed"`` (every
            timestep in each batch, ``batch_size`` rows per timestep).
        reset_act_state: fresh scale-optimizer state per (epoch, timestep) visit (code: yes).
        timesteps: train only these calibrated timesteps (default: all).
        eval_samples_per_t: rows per timestep of the before/after loss report (0: no report).
        autocast: bf16 autocast on CUDA (off by default).
    """

    critical: tuple[str, ...] | Literal["auto", "sensitivity"] = "auto"
    top_k: int = 8
    sensitivity_bits: int = 4
    sensitivity_samples: int = 4
    weight_lr: float = 1e-5
    act_lr: float = 1e-4
    epochs: int = 20
    samples_per_t: int = 64
    batch_size: int = 4
    local_weight: float = 1.0
    global_weight: float = 2.0
    loss: Literal["paper", "code"] = "paper"
    global_loss: bool = True
    order: Order = "shuffled"
    reset_act_state: bool = False
    timesteps: tuple[float, ...] | None = None
    eval_samples_per_t: int = 8
    autocast: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.critical, list):
            object.__setattr__(self, "critical", tuple(self.critical))
        if isinstance(self.timesteps, list):
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
        check_types(self)
        if not isinstance(self.critical, str):
            clash = [r for r in self.critical if r in TIME_EMBEDDING_ROLES]
            if not self.critical or clash:
                raise ValueError(f"CMA critical roles must be non-empty and exclude the time-embedding roles {TIME_EMBEDDING_ROLES} "
                                 f"(TLA trains those), got {self.critical}")
        elif self.critical not in ("auto", "sensitivity"):
            raise ValueError(f"CMA critical must be 'auto', 'sensitivity' or a tuple of roles, got {self.critical!r}")
        if self.top_k < 1 or self.sensitivity_samples < 1:
            raise ValueError("top_k and sensitivity_samples must be >= 1")
        if self.weight_lr <= 0 or self.act_lr <= 0:
            raise ValueError("CMA learning rates must be > 0 (paper and code: weight 1e-5, act 1e-4)")
        if self.epochs < 0 or self.samples_per_t < 1 or self.batch_size < 1 or self.eval_samples_per_t < 0:
            raise ValueError("CMA needs epochs >= 0, samples_per_t >= 1, batch_size >= 1 and eval_samples_per_t >= 0")
        if self.loss not in ("paper", "code") or self.order not in ORDERS:
            raise ValueError(f"CMA loss must be 'paper' or 'code' and order one of {ORDERS}")
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))


def conditioning_inputs(calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """Recorded inputs besides the sample and the timestep that condition the model: integer ones (class labels)
    and floating ones that vary across rows (embeddings, context tokens); constant tensors and masks are not."""
    extra = {k: v for k, v in calib.inputs.items() if k not in (calib.sample_key, calib.timestep_key)}
    return {k: v for k, v in extra.items() if v.dtype != torch.bool
            and (not v.is_floating_point() or not torch.equal(v, v[:1].expand_as(v)))}


@torch.no_grad()
def detect_family(model: nn.Module, adapter: ModelAdapter, layers: Mapping[str, LayerInfo], calib: CalibrationSet,
                  device: torch.device | str | None = None) -> Family:
    """What ``model`` conditions on, for CMA's automatic roles.

    With cross-attention (read from the context its attention modules see in one forward): ``"class"`` for one
    context token (ImageNet LDM), ``"text"`` for more. Without: ``"text"`` if a conditioning input is a sequence of
    tokens ``[N, L > 1, D]``, ``"class"`` if there is another conditioning input (a class label entering through an
    embedding, see ``conditioning_inputs``) or a layer plays the adapter's ``cond`` role, else ``"unconditional"``."""
    cross = [name for name, info in adapter.attentions(model).items() if info.cross]
    if cross:
        return _cross_attention_family(model, cross, calib, device)
    conditioning = conditioning_inputs(calib)
    if any(v.is_floating_point() and v.ndim == 3 and v.shape[1] > 1 for v in conditioning.values()):
        return "text"
    if conditioning or any(info.has_role(("cond",)) for info in layers.values()):
        return "class"
    return "unconditional"


def _cross_attention_family(model: nn.Module, cross: list[str], calib: CalibrationSet,
                            device: torch.device | str | None) -> Family:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens: list[int] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if isinstance(context, torch.Tensor) and context.ndim == 3:
            tokens.append(context.shape[1])

    handles = [model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True) for n in cross]
    try:
        with quant_state(model, weight=False, act=False) if is_quantized(model) else contextlib.nullcontext():
            model(**calib.model_kwargs(torch.arange(1), device))
    finally:
        for handle_ in handles:
            handle_.remove()
    return "class" if tokens and max(tokens) == 1 else "text"


def model_family(model: nn.Module, calib: CalibrationSet, device: torch.device | str | None = None) -> Family:
    """``detect_family`` of a prepared ``model``."""
    h = handle(model)
    return detect_family(model, h.adapter, h.layers, calib, device)


def critical_roles(model: nn.Module, adapter: ModelAdapter, layers: Mapping[str, LayerInfo], family: Family,
                   config: CMAConfig) -> tuple[str, ...] | Literal["sensitivity"]:
    """The roles whose layers CMA trains on ``model`` (``layers``: the adapter's roles), or ``"sensitivity"``.

    ``critical="auto"`` on a model where no layer plays its family's roles (a foreign model without named roles)
    falls back to the sensitivity ranking, with a warning; explicit roles that no layer plays raise."""
    if config.critical == "sensitivity":
        return "sensitivity"
    roles = CRITICAL_ROLES[family] if config.critical == "auto" else config.critical
    if any(info.has_role(roles) for info in layers.values()):
        return roles
    fix = f"name them, e.g. {roles_example(adapter, roles)}"
    if config.critical != "auto":
        raise ValueError(f"no layer of {type(model).__name__} plays the CMA roles {roles}: {fix}, or pass "
                         "CMAConfig(critical='sensitivity')")
    warnings.warn(f"no layer of {type(model).__name__} plays CMA's roles for a {family!r} model {roles}: CMA trains the "
                  f"{config.top_k} layers most sensitive to {config.sensitivity_bits}-bit inputs instead "
                  f"(critical='sensitivity'); to train the paper's layers, {fix}")  # one location: shown once per run
    return "sensitivity"


def critical_layers(model: nn.Module, calib: CalibrationSet, config: CMAConfig, *, device: torch.device,
                    seed: int = 0, progress: bool = False) -> tuple[Family, list[str]]:
    """``(model family, names of the layers CMA trains)``."""
    h = handle(model)
    family = model_family(model, calib, device)
    roles = critical_roles(model, h.adapter, h.layers, family, config)
    if roles == "sensitivity":
        ranking = layer_sensitivity(model, calib, bits=config.sensitivity_bits, samples_per_t=config.sensitivity_samples,
                                    exclude_roles=TIME_EMBEDDING_ROLES, device=device, seed=seed, progress=progress)
        return family, [s.name for s in ranking[: config.top_k]]
    return family, layers_with_roles(model, roles)


def cma_objective(model: nn.Module, layers: list[str], family: Family, config: CMAConfig) -> Objective:
    """Layers' weights, every non-time-embedding activation scale, and the loss weights."""
    all_layers = quant_layers(model)
    te_quantizers = {id(q) for n in layers_with_roles(model, TIME_EMBEDDING_ROLES) for q in all_layers[n].act_quantizers()}
    scales = {n: q for n, q in model.named_modules() if isinstance(q, ActQuantizer) and id(q) not in te_quantizers}
    if config.loss == "code":
        local = config.local_weight if family == "text" else 0.0
        global_weight = float(len(layers))
    else:
        local, global_weight = config.local_weight, config.global_weight
    return Objective(list(layers), scales, list(layers), local, global_weight if config.global_loss else 0.0)


def cma_plan(model: nn.Module, calib: CalibrationSet, config: CMAConfig, seed: int = 0) -> list[Batch]:
    """CMA's training batches (``run_cma`` draws the same ones for the same ``seed``)."""
    return plan_batches(model, calib, samples_per_t=config.samples_per_t, epochs=config.epochs, batch_size=config.batch_size,
                        resample=True, order=config.order, generator=generator(seed, 41), timesteps=config.timesteps)


def run_cma(
    model: nn.Module,
    calib: CalibrationSet,
    config: CMAConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> FinetuneResult:
    """Critical module alignment (+ global loss) of a prepared, calibrated ``model``.

    Returns the per-step losses and the CMA loss on ``eval_samples_per_t`` rows per timestep before and after."""
    config = config or CMAConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    family, layers = critical_layers(model, calib, config, device=device, seed=seed, progress=progress)
    objective = cma_objective(model, layers, family, config)
    plan = cma_plan(model, calib, config, seed)
    rows = (evaluation_batches(model, calib, config.eval_samples_per_t, max(config.batch_size, 8),
                               torch.Generator().manual_seed(seed + 43), config.timesteps, mixed=config.order == "mixed")
            if config.eval_samples_per_t else [])
    result = FinetuneResult()
    if rows:
        result.loss_before = evaluate(model, calib, objective, rows, device=device, use_autocast=config.autocast)
    result.losses = finetune(model, calib, objective, plan, weight_lr=config.weight_lr, act_lr=config.act_lr, device=device,
                             use_autocast=config.autocast, reset_act_state=config.reset_act_state, progress=progress, desc="CMA")
    if rows:
        result.loss_after = evaluate(model, calib, objective, rows, device=device, use_autocast=config.autocast)
    logger.info("CMA (%s model) on %d layers, %d activation scales: loss %.4g -> %.4g (%d steps)", family, len(layers),
                len(objective.act_quantizers), result.loss_before, result.loss_after, len(result.losses))
    return result
