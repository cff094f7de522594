"""``convert``: the one way out of fake quantization. Every fake-quant layer becomes a deployed layer holding the
integer codes of its (finetuned, possibly AdaRound-rounded) quantized weight and its static activation tables;
every quantized attention processor and intercepted SDPA call becomes the deployed twin of its flavour
(``deploy/attention.py``: diffusers ``Attention``, SD3 joint, FLUX, SDPA sites). The ``TimestepState`` stays; the timestep
pre-hook becomes the device one (``DeviceTimestepHook``): deployed modules read the rows found on the device, so a
CUDA graph or ``torch.compile`` captures the whole forward.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..fp8 import fp8_codes
from ..kernels import ops
from ..kernels.reference import code_offset, pack_int4
from ..nn import (ActQuantizer, QuantAttnProcessor, QuantFluxAttnProcessor, QuantJointAttnProcessor, QuantLayerMixin,
                  QuantLinear, WeightQuantizer)
from ..nn.attention import OperandQuantizers
from ..nn.sdpa import SDPA_ATTR, AttentionSite
from ..prepare import DEPLOYED_KEY, HANDLE_ATTR, handle, quant_layers
from ..timestep import TimestepState, install_device_timestep_hook
from .attention import PROCESSORS, DeployedOperands
from .layers import BACKENDS, Backend, DeployedConv, DeployedLayer, DeployedLinear
from .operand import ActTable, QuantizedOperand

logger = logging.getLogger(__name__)

# fake-quant attention flavour -> the kind of its deployed twin (``deploy.attention.PROCESSORS``); subclasses first
DEPLOYED_FLAVOURS: tuple[tuple[type[OperandQuantizers], str], ...] = (
    (QuantJointAttnProcessor, "joint"), (QuantFluxAttnProcessor, "flux"), (QuantAttnProcessor, "attn"),
    (AttentionSite, "sdpa"))


def is_deployed(model: nn.Module) -> bool:
    """Whether ``model`` went through ``convert`` (or was loaded with ``load_deployed``)."""
    h = getattr(model, "_questdiff", None)
    return h is not None and DEPLOYED_KEY in h.extra


def _check_backend(model: nn.Module, backend: Backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "triton":
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        if not ops.triton_runs_on(device, backend):
            raise ValueError(f"backend='triton' needs a CUDA device and the triton package (the model is on {device}); "
                             "move the model to a GPU, or use backend='auto' (Triton on GPU, reference elsewhere)")


def _layout(weight: torch.Tensor) -> torch.Tensor:
    """``[N, C, *kernel]`` or ``[N, K]`` -> ``[N, taps, C]`` (channels last; a linear layer has one tap)."""
    if weight.ndim == 2:
        return weight[:, None, :]
    return weight.flatten(2).permute(0, 2, 1)


def _weight_integers(quantizer: WeightQuantizer, weight: torch.Tensor, name: str) -> torch.Tensor:
    """The fake quantizer's integers of ``weight`` in its scale layout (exactly what it multiplies)."""
    with torch.no_grad():
        was = quantizer.enabled
        quantizer.enabled = True
        try:
            fake = quantizer.view(quantizer(weight.float()))
        finally:
            quantizer.enabled = was
        integers = torch.round(fake / quantizer.scale) + quantizer.zero_point
        back = (integers - quantizer.zero_point) * quantizer.scale
        if not torch.allclose(back, fake, rtol=1e-5, atol=1e-7 * float(quantizer.scale.abs().max())):
            raise ValueError(f"layer {name}: its quantized weight is not on its quantizer's integer grid; "
                             "convert supports quantizers of questdiff.nn (round-to-nearest and AdaRound)")
        return integers.clamp(quantizer.qmin, quantizer.qmax)


def _operand(weight: torch.Tensor, wq: WeightQuantizer, aq: ActQuantizer, state: TimestepState,
             name: str, flip: bool = False) -> QuantizedOperand:
    """Integer form of one input segment: ``weight`` ``[N, C, ...]`` with its weight and activation quantizers;
    ``flip``: store channels-last weights spatially flipped (transposed convs run as plain convs, ``DeployedConv``)."""
    if wq.bits > 8 or aq.bits > 8:
        raise ValueError(f"layer {name}: convert supports up to 8-bit weights and activations "
                         f"(got W{wq.bits}A{aq.bits}); keep such layers in fake quantization")
    if wq.fp8 or aq.fp8:
        return _fp8_operand(weight, wq, aq, state, name, flip)
    n = weight.shape[0]
    integers = _weight_integers(wq, weight, name)  # [N, 1|G, ...] view layout
    groups = integers.shape[1] if wq.spec.granularity == "group" else 1
    scale = wq.scale.reshape(-1)
    zero = wq.zero_point.reshape(-1)
    if scale.numel() == 1:  # per tensor: one scale broadcast to every output channel
        scale, zero = scale.expand(n), zero.expand(n)
    scale, zero = scale.reshape(n, groups).float(), zero.reshape(n, groups).float()
    integers = integers.reshape(weight.shape)
    if flip and groups == 1:
        integers = integers.flip(dims=tuple(range(2, integers.ndim)))
    # grouped weights keep the flattened input order (their groups run along it); others go channels-last
    values = integers.reshape(n, 1, -1) if groups > 1 else _layout(integers)
    taps, channels = values.shape[1], values.shape[2]
    packed = wq.bits <= 4 and channels % 2 == 0
    act_o = code_offset(aq.qmin, aq.qmax)
    operand = QuantizedOperand(
        rows=aq.num_rows, act_channels=aq.scale.shape[1], act_range=(aq.qmin - act_o, aq.qmax - act_o),
        out_channels=n, taps=taps, channels=channels, weight_bits=4 if packed else 8, weight_groups=groups,
        state=state,
    ).to(weight.device)
    operand.act.fill(aq.scale.detach(), aq.zero_point, act_o)
    with torch.no_grad():
        if packed:
            operand.weight.copy_(pack_int4((values - wq.qmin).to(torch.int16)))
            operand.weight_zero.copy_((zero - wq.qmin).to(torch.int16))
        else:
            o = code_offset(wq.qmin, wq.qmax)
            operand.weight.copy_((values - o).to(torch.int8))
            operand.weight_offset.copy_(o - zero)
            operand.weight_offset_used = bool(operand.weight_offset.any())
        operand.weight_scale.copy_(scale)
        if groups == 1:
            operand.weight_sum.copy_(operand.integer_weight().flatten(1).sum(dim=1).float())
    return operand


def _fp8_operand(weight: torch.Tensor, wq: WeightQuantizer, aq: ActQuantizer, state: TimestepState,
                 name: str, flip: bool = False) -> QuantizedOperand:
    """FP8 form of one input segment: e4m3 weight codes (the fake quantizer's values exactly: ``codes * scale``) and
    the activations' per-timestep e4m3 scales (``flip`` as in ``_operand``)."""
    if not (wq.fp8 and aq.fp8):
        raise ValueError(f"layer {name}: FP8 runs with FP8 weights and activations together (W{wq.bits}A{aq.bits} "
                         "mixes grids); quantize with the W8A8-FP8 preset")
    n = weight.shape[0]
    scale = wq.scale.reshape(-1).float()
    scale = scale.expand(n) if scale.numel() == 1 else scale
    weight = weight.detach().flip(dims=tuple(range(2, weight.ndim))) if flip else weight.detach()
    codes = _layout(fp8_codes(weight, wq.scale))  # [N, taps, C]
    operand = QuantizedOperand(
        rows=aq.num_rows, act_channels=aq.scale.shape[1], act_range=(-448, 448), out_channels=n, taps=codes.shape[1],
        channels=codes.shape[2], weight_bits=8, weight_groups=1, state=state, fp8=True,
    ).to(weight.device)
    operand.act.fill(aq.scale.detach(), torch.zeros_like(aq.scale), 0)
    with torch.no_grad():
        operand.weight.copy_(codes)
        operand.weight_scale.copy_(scale[:, None])
    return operand


def deploy_layer(layer: QuantLayerMixin, state: TimestepState, backend: Backend, name: str = "") -> DeployedLayer:
    """The deployed twin of one fake-quant layer (its quantizers must be enabled)."""
    quantizers = [*layer.weight_quantizers(), *layer.act_quantizers()]
    if not all(q.enabled for q in quantizers):
        raise ValueError(f"layer {name} has quantization switched off; switch it on "
                         "(questdiff.set_quant_state(model, True, True)) before convert")
    acts = {"weight_quantizer": layer.act_quantizer, "weight_quantizer_skip": layer.act_quantizer_skip}
    transposed = isinstance(layer, _ConvNd) and layer.transposed
    operands = [_operand(w.detach(), getattr(layer, attr), acts[attr], state, name, flip=transposed)
                for attr, w in layer.weight_halves()]
    bias = None if layer.bias is None else layer.bias.detach().clone()
    common = {"operands": operands, "split": layer.split, "bias": bias, "backend": backend, "rotation": layer.rotation,
              "smoothing": layer.smoothing}
    if isinstance(layer, QuantLinear):
        return DeployedLinear(layer.in_features, layer.out_features, **common)
    if not isinstance(layer, _ConvNd):
        raise ValueError(f"layer {name}: convert cannot pack a {type(layer).__name__}; keep the model in fake "
                         "quantization (questdiff.save)")
    return DeployedConv(len(layer.kernel_size), layer.in_channels, layer.out_channels, layer.kernel_size,
                        layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode,
                        transposed=transposed, output_padding=layer.output_padding if transposed else None, **common)


def fake_quant_leftovers(model: nn.Module) -> list[str]:
    """Modules of ``model`` that still fake-quantize (they hold activation quantizers): what convert kept."""
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name, m in model.named_modules()
              if isinstance(m, ActQuantizer)}
    return sorted(o for o in owners if not any(p != o and o.startswith(p + ".") for p in owners))


def _table(quantizer: ActQuantizer, state: TimestepState) -> ActTable:
    o = code_offset(quantizer.qmin, quantizer.qmax)
    table = ActTable(quantizer.num_rows, quantizer.scale.shape[1], (quantizer.qmin - o, quantizer.qmax - o), state)
    table = table.to(quantizer.scale.device)
    table.fill(quantizer.scale.detach(), quantizer.zero_point, o)
    return table


def deploy_attention(operands: OperandQuantizers, state: TimestepState, backend: Backend) -> DeployedOperands:
    """The deployed twin of a fake-quant attention processor or SDPA site (either format): the deployed class of
    the same flavour (``DEPLOYED_FLAVOURS``), holding the quantizers' static tables."""
    kind = next((kind for cls, kind in DEPLOYED_FLAVOURS if isinstance(operands, cls)), None)
    if kind is None:
        raise NotImplementedError(f"{type(operands).__name__} has no deployed form")
    quantizers = operands.act_quantizers()
    if not all(q.enabled for q in quantizers) or any(q.bits > 8 for q in quantizers):
        raise ValueError("attention quantizers must be enabled and at most 8 bits to convert")
    named = {"q": operands.q_quantizer, "k": operands.k_quantizer, "v": operands.v_quantizer,
             "probs": operands.probs_quantizer}
    tables = {name: _table(q, state) for name, q in named.items() if q is not None}
    probs = operands.probs_quantizer
    if probs is not None and probs.zero_point.any():
        raise ValueError("the softmax-output quantizer must have a zero point of 0")
    return PROCESSORS[kind](tables, None if probs is None else probs.qmax, backend)


def convert(model: nn.Module, backend: Backend = "auto") -> nn.Module:
    """Turn a fake-quantized denoiser into its deployed form, in place, and return it.

    Weights become int8 codes (packed two per byte at 4 bits) with their scales; activation scales become static
    per-timestep tables; q/k/v/softmax-output quantization runs in the 8-bit attention kernel. ``backend="auto"``
    runs the Triton kernels on CUDA and the pure-torch reference elsewhere (CPU), ``"reference"`` always the
    reference, ``"triton"`` requires a GPU. Every Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d (any stride,
    padding, padding mode, dilation and groups) runs on the kernels (``DeployedConv``), except layers whose grids
    no GEMM can apply (per-channel activations, per-group weight scales): those and attention with masks run
    *simulated* (dequantized, exact but not faster); convert warns naming them. Rotated layers
    (``ActivationSpec.rotation``: per-tensor 4-bit activations) keep their rotation and run the kernels on the
    rotated input; smoothed layers (``ActivationSpec.smoothing``) keep their smoothing likewise.

    Raises ``ValueError`` naming the layer, before changing the model, if a layer cannot be packed (more than 8
    bits); and if the model is not quantized, already converted, or has quantization switched off.
    """
    h = handle(model)
    if DEPLOYED_KEY in h.extra:
        raise ValueError("the model is already converted")
    _check_backend(model, backend)
    simulated: list[str] = []
    deployed_layers = {name: deploy_layer(layer, h.state, backend, name) for name, layer in quant_layers(model).items()}
    for name, deployed in deployed_layers.items():  # all built first: a refused layer leaves the model unchanged
        model.set_submodule(name, deployed)
        if not deployed.runs_kernels:
            simulated.append(name)
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, OperandQuantizers):
            deployed_attn = deploy_attention(processor, h.state, backend)
            module.set_processor(deployed_attn)
            if not deployed_attn.runs_kernels:
                simulated.append(f"{name} (attention)")
    router = getattr(model, SDPA_ATTR, None)
    for i, site in enumerate(router.sites if router is not None else []):
        router.sites[i] = deployed_site = deploy_attention(site, h.state, backend)
        if not deployed_site.runs_kernels:
            simulated.append(f"{SDPA_ATTR}.sites.{i} (attention call of {router.owners[i] or 'the forward'})")
    h.extra[DEPLOYED_KEY] = {"backend": backend}
    h.hook.remove()  # deployed modules read the rows on the device: no host read per forward
    h.hook = install_device_timestep_hook(model, h.adapter.timestep_argument, HANDLE_ATTR, h.schedule)
    kept = fake_quant_leftovers(model)
    if kept:
        warnings.warn(f"{len(kept)} modules have no deployed form yet and stay in fake quantization (exact, neither "
                      f"packed nor faster; save_deployed refuses such a model): {', '.join(kept[:8])}"
                      f"{' ...' if len(kept) > 8 else ''}", stacklevel=2)
    if simulated:
        warnings.warn(f"{len(simulated)} layers have no low-bit kernel for their quantization grids and run "
                      f"simulated (exact, not faster): {', '.join(simulated[:8])}{' ...' if len(simulated) > 8 else ''}",
                      stacklevel=2)
    logger.info("converted %s: %s", type(model).__name__, deployment(model).describe())
    return model


@dataclass(frozen=True)
class Deployment:
    """What a deployed model runs: its deployed layers and attention processors, how many of them run the low-bit
    kernels (the others run simulated), and the modules still in fake quantization."""

    layers: int
    attention: int
    on_kernels: int
    fake_quant: int

    @property
    def simulated(self) -> int:
        return self.layers + self.attention - self.on_kernels

    def describe(self) -> str:
        kept = f", {self.fake_quant} kept fake-quant" if self.fake_quant else ""
        return (f"{self.layers} layers + {self.attention} attention deployed ({self.on_kernels} on kernels, "
                f"{self.simulated} simulated){kept}")


def deployment(model: nn.Module) -> Deployment:
    """The one count of a deployed model's modules, for ``convert``'s log and the command line's summary alike."""
    layers = [m for m in model.modules() if isinstance(m, DeployedLayer)]
    attention = [m for m in model.modules() if isinstance(m, DeployedOperands)]  # processors and SDPA sites
    return Deployment(len(layers), len(attention), sum(m.runs_kernels for m in [*layers, *attention]),
                      len(fake_quant_leftovers(model)))
