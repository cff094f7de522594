"""BRECQ block reconstruction with AdaRound (spec §2.5), as Q-Diffusion / QuEST run it, without its defects.

Units are the adapter's blocks (resnets, transformer / attention blocks) and every quantized layer outside them,
reconstructed one after another in forward order. For each unit:

1. its inputs are captured from the model with weights quantized (units before it already hard-rounded) and
   activations off (the code's ``asym=True, act_quant=False``); its targets are the FP model's outputs;
2. the unit's weight quantizers become soft ``AdaRoundQuantizer``s (``h(alpha) = frac(w / s)``) and only
   ``alpha`` is trained with Adam on ``channel-sum MSE + reg_weight * sum(1 - |2h - 1|^beta)`` (regulariser after
   the warm-up, beta annealed linearly);
3. the rounding is hardened (``round_up = alpha >= 0``).

Differences from the official code (spec §6.14): captured data stays in memory (optionally on the CPU, optionally
in bf16/fp16), never on disk; batches are drawn i.i.d. over all calibration rows by default instead of sweeping
timestep shards in order (``order="sequential"`` reproduces the sweep); captures stop the forward right after the
unit, so the rest of the network is not run.

On several processes (``torchrun``) the capture's batches are split over the ranks and joined (every rank holds
every row, as one process does), each iteration's batch is split over the ranks with the gradients summed
(``distributed.batch_share`` / ``reduce_gradients``), and the units' losses are summed over the ranks' rows.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .. import distributed
from ..config import check_types
from ..nn import QuantLayerMixin
from ..nn.adaround import AdaRoundQuantizer
from ..prepare import handle, quant_layers, quant_state
from .adaround import AdaRoundConfig, beta_at, convert_layer, rounding_regularizer
from .common import generator, output_tensor, rows_by_quantizer_row, trainable_only
from .data import CalibrationSet
from .timing import format_seconds, forward_backward_seconds, synchronize

if TYPE_CHECKING:
    from .methods import StageProgress

logger = logging.getLogger(__name__)

Order = Literal["iid", "sequential"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BrecqConfig:
    """Block reconstruction settings (defaults: the official code, spec §2.5 / §8).

    Attributes:
        iters: AdaRound iterations per unit (code: ``cali_iters`` = 20000).
        batch_size: rows per iteration (code: ``cali_batch_size / 2`` = 16; SD 4).
        lr: Adam learning rate of ``alpha`` (code: 1e-3, no scheduler).
        adaround: rounding objective (reg weight 0.01, beta 20 -> 2, warm-up 0.2).
        order: ``"iid"`` draws every batch from all calibration rows (default, fixes spec §6.14);
            ``"sequential"`` reproduces the code: ``num_shards`` contiguous timestep-ordered shards, noisiest first,
            ``iters / num_shards`` iterations each.
        num_shards: shards of the sequential order (code: 10).
        max_samples: use at most this many calibration rows, spread evenly over timesteps (code: all rows).
        capture_batch_size: rows per forward while capturing (default: ``quantize(batch_size=...)``).
        storage: keep captured inputs/targets on the calibration ``"device"`` or on the ``"cpu"``.
        storage_dtype: dtype of the captured data (``"float32"``; ``"bfloat16"``/``"float16"`` halve memory).
    """

    iters: int = 20000
    batch_size: int = 16
    lr: float = 1e-3
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    order: Order = "iid"
    num_shards: int = 10
    max_samples: int | None = None
    capture_batch_size: int | None = None
    storage: Literal["device", "cpu"] = "device"
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.adaround, dict):  # from_dict / CLI convenience
            object.__setattr__(self, "adaround", AdaRoundConfig(**self.adaround))
        check_types(self)
        if self.iters < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"BrecqConfig needs iters >= 0, batch_size >= 1 and lr > 0 (got {self.iters}, {self.batch_size}, {self.lr})")
        if self.order not in ("iid", "sequential"):
            raise ValueError(f"unknown reconstruction order {self.order!r}: use 'iid' or 'sequential'")
        if self.num_shards < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("num_shards and max_samples must be >= 1")
        if self.storage not in ("device", "cpu") or self.storage_dtype not in _DTYPES:
            raise ValueError(f"storage must be 'device' or 'cpu' and storage_dtype one of {sorted(_DTYPES)}")


@dataclass
class UnitResult:
    """Reconstruction loss (channel-sum MSE on all captured rows) of one unit with round-to-nearest weights and
    after AdaRound (hard rounding)."""

    name: str
    rtn_loss: float
    loss: float
    iters: int = 0
    train_seconds: float = 0.0  # the AdaRound iterations only
    capture_seconds: float = 0.0  # capturing inputs and targets
    seconds: float = 0.0  # everything for this unit


class _Stop(Exception):
    """Raised by a capture hook to end the forward right after the unit."""


@dataclass
class Captured:
    """Arguments (or outputs) of one unit over the captured calibration rows.

    Tensor leaves whose first dim is the batch are concatenated over rows (``[N, ...]``); other leaves are static
    (taken from the first call).
    """

    spec: Any
    leaves: list[Any]
    batched: list[bool]
    count: int

    def take(self, index: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
        """The captured structure for rows ``index`` on ``device`` (floating tensors in ``dtype``)."""
        leaves = []
        for leaf, batched in zip(self.leaves, self.batched):
            if isinstance(leaf, torch.Tensor):
                leaf = leaf[index.to(leaf.device)] if batched else leaf
                leaf = leaf.to(device, dtype if leaf.is_floating_point() else leaf.dtype, non_blocking=True)
            leaves.append(leaf)
        return pytree.tree_unflatten(leaves, self.spec)


def _collect(calls: list[tuple[Any, int]], storage: torch.device, dtype: torch.dtype) -> Captured:
    first_leaves, spec = pytree.tree_flatten(calls[0][0])
    per_call = [pytree.tree_flatten(obj)[0] for obj, _ in calls]
    leaves, batched = [], []
    for i, leaf in enumerate(first_leaves):
        is_batched = isinstance(leaf, torch.Tensor) and all(
            isinstance(c[i], torch.Tensor) and c[i].ndim > 0 and c[i].shape[0] == n for c, (_, n) in zip(per_call, calls)
        )
        if is_batched:
            leaf = torch.cat([c[i].detach().to(storage, dtype if c[i].is_floating_point() else c[i].dtype) for c in per_call])
        elif isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().to(storage)
        leaves.append(leaf)
        batched.append(is_batched)
    return Captured(spec, leaves, batched, sum(n for _, n in calls))


def forward_order(model: nn.Module, calib: CalibrationSet, names: list[str], device: torch.device) -> list[str]:
    """``names`` (modules of ``model``) sorted by their first call in one forward; never-called ones are dropped."""
    order: dict[str, int] = {}
    hooks = []
    for name in names:
        def hook(_m: nn.Module, _a: Any, name: str = name) -> None:
            order.setdefault(name, len(order))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), quant_state(model, weight=False, act=False):
            model(**calib.model_kwargs(torch.nonzero(calib.ts == calib.timesteps[0]).flatten()[:1], device))
    finally:
        for h in hooks:
            h.remove()
    return sorted(order, key=order.__getitem__)


def reconstruction_units(model: nn.Module, calib: CalibrationSet, device: torch.device) -> list[str]:
    """The adapter's blocks plus every quantized layer outside them, in forward order."""
    blocks = handle(model).adapter.blocks(model)
    prefixes = tuple(b + "." for b in blocks)
    loose = [n for n in quant_layers(model) if not n.startswith(prefixes) and n not in blocks]
    return forward_order(model, calib, blocks + loose, device)


def _select_rows(model: nn.Module, calib: CalibrationSet, max_samples: int | None, seed: int) -> list[torch.Tensor]:
    """Row indices per timestep (calibration order), at most ``max_samples`` in total, spread evenly."""
    parts = [p for ps in rows_by_quantizer_row(model, calib).values() for p in ps]
    if max_samples is None:
        return parts
    per = max(1, max_samples // len(parts))
    g = generator(seed, 11)
    return [p[torch.randperm(len(p), generator=g)[:per]].sort().values for p in parts]


@torch.no_grad()
def capture(
    model: nn.Module,
    module: nn.Module,
    calib: CalibrationSet,
    parts: list[torch.Tensor],
    *,
    what: Literal["input", "output"],
    device: torch.device,
    batch_size: int,
    storage: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Captured:
    """Run ``model`` over the rows ``parts`` (one timestep per batch) and keep ``module``'s first call's
    ``(args, kwargs)`` (``what="input"``) or output tensor (``"output"``), stopping each forward right there.

    In a process group each rank runs its block of the batches (``distributed.shard``) and every rank gets all rows
    back, exactly as one process captures them."""
    chunks = [chunk for part in parts for chunk in part.split(batch_size)]
    world = distributed.world_size()
    if world > 1 and len(chunks) >= world:
        mine = _capture(model, module, calib, chunks[distributed.shard(len(chunks))], what, device, storage, dtype)
        joined = _join_blocks(mine, [sum(len(c) for c in chunks[distributed.shard(len(chunks), r, world)])
                                     for r in range(world)])
        if joined is not None:
            return joined
        logger.debug("ranks captured differently structured blocks: every rank captures every row instead")
    return _capture(model, module, calib, chunks, what, device, storage, dtype)


def _capture(model: nn.Module, module: nn.Module, calib: CalibrationSet, chunks: list[torch.Tensor],
             what: Literal["input", "output"], device: torch.device, storage: torch.device, dtype: torch.dtype) -> Captured:
    calls: list[tuple[Any, int]] = []
    size = [0]

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(((args, kwargs), size[0]))
        raise _Stop

    def post_hook(_m: nn.Module, _a: Any, out: Any) -> None:
        calls.append((unit_outputs(out), size[0]))
        raise _Stop

    hook = module.register_forward_pre_hook(pre_hook, with_kwargs=True) if what == "input" else module.register_forward_hook(post_hook)
    try:
        for chunk in chunks:
            size[0] = len(chunk)
            try:
                model(**calib.model_kwargs(chunk, device))
            except _Stop:
                pass
            else:
                raise RuntimeError(f"the unit {type(module).__name__} was not called by the denoiser's forward")
    finally:
        hook.remove()
    return _collect(calls, storage, dtype)


def _join_blocks(block: Captured, counts: list[int]) -> Captured | None:
    """Every rank's captured block joined in rank order (``counts``: rows per rank), or ``None`` if the ranks'
    blocks do not have the same structure (a leaf batched on one rank and static on another)."""
    layout = [str(block.spec), *[(b, tuple(leaf.shape[1:]), leaf.dtype) if b else None
                                 for leaf, b in zip(block.leaves, block.batched)]]
    if any(other != layout for other in distributed.gather(layout)):
        return None
    leaves = [distributed.gather_blocks(leaf, counts) if b else leaf for leaf, b in zip(block.leaves, block.batched)]
    return Captured(block.spec, leaves, block.batched, sum(counts))


def unit_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """Every tensor a unit returns: the main output tensor, or each tensor of a tuple (MMDiT / FLUX blocks return
    the context and the image stream; SD3's last block returns ``None`` for the context, which is skipped)."""
    if isinstance(out, (tuple, list)):
        tensors = tuple(o for o in out if isinstance(o, torch.Tensor))
        if tensors:
            return tensors
    return (output_tensor(out),)


def reconstruction_loss(pred: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``channel_sum_mse`` summed over the unit's outputs."""
    losses = [channel_sum_mse(p, t) for p, t in zip(pred, target, strict=True)]
    return sum(losses[1:], losses[0])


def channel_sum_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's rec loss: squared error summed over channels, averaged over batch and positions.

    The channel is dim 1 of ``[B, C, ...]`` conv/2-D outputs and the last dim of ``[B, tokens, C]`` outputs.
    """
    dim = -1 if pred.ndim == 3 else 1
    return (pred.float() - target.float()).pow(2).sum(dim).mean()


def _unit_forward(unit: nn.Module, inputs: Captured, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    args, kwargs = inputs.take(index, device)
    return unit_outputs(unit(*args, **kwargs))


@torch.no_grad()
def unit_loss(unit: nn.Module, inputs: Captured, targets: Captured, device: torch.device, batch_size: int = 64) -> float:
    """Channel-sum MSE of ``unit`` on all captured rows (each rank sums its block of them)."""
    total = 0.0
    for index in torch.arange(inputs.count)[distributed.shard(inputs.count)].split(batch_size):
        total += float(reconstruction_loss(_unit_forward(unit, inputs, index, device), targets.take(index, device))) * len(index)
    return distributed.sum_over_ranks([total])[0] / max(inputs.count, 1)


def _batch_index(step: int, config: BrecqConfig, count: int, g: torch.Generator) -> torch.Tensor:
    if config.order == "iid":
        return torch.randperm(count, generator=g)[: config.batch_size]
    shard = min(step * config.num_shards // max(config.iters, 1), config.num_shards - 1)
    bounds = torch.linspace(0, count, config.num_shards + 1).long()
    lo, hi = int(bounds[shard]), max(int(bounds[shard + 1]), int(bounds[shard]) + 1)
    return lo + torch.randperm(min(hi, count) - lo, generator=g)[: config.batch_size]


def reconstruct_unit(
    unit: nn.Module,
    inputs: Captured,
    targets: Captured,
    config: BrecqConfig,
    *,
    device: torch.device,
    seed: int = 0,
    name: str = "",
    on_step: Callable[[], Any] | None = None,
) -> UnitResult:
    """AdaRound every quantized layer of ``unit`` on captured ``inputs`` -> ``targets``; ends hard-rounded.

    Weight quantization must be on and activation quantization off (see ``quant_state``). ``on_step`` is called
    after every iteration (progress bars)."""
    layers = [m for m in unit.modules() if isinstance(m, QuantLayerMixin)]
    rtn_loss = unit_loss(unit, inputs, targets, device)
    quantizers: list[AdaRoundQuantizer] = [q for layer in layers for q in convert_layer(layer, True, config.adaround)]
    alphas = [q.alpha for q in quantizers if q.alpha is not None]
    start = time.perf_counter()
    if alphas and config.iters > 0:
        optimizer = torch.optim.Adam(alphas, lr=config.lr)
        g = generator(seed, 13)
        warm = config.adaround.warmup * config.iters
        with trainable_only(unit, alphas), torch.enable_grad():
            for step in range(config.iters):
                # this rank's block of the batch (all of it in one process); gradients are summed over ranks
                index, weight = distributed.batch_share(_batch_index(step, config, inputs.count, g))
                loss = None
                if len(index):
                    loss = reconstruction_loss(_unit_forward(unit, inputs, index, device), targets.take(index, device))
                    if weight != 1.0:
                        loss = loss * weight
                if step >= warm and config.adaround.reg_weight > 0:
                    beta = beta_at(step, config.iters, config.adaround)
                    reg = config.adaround.reg_weight * distributed.replicated(rounding_regularizer(quantizers, beta))
                    loss = reg if loss is None else loss + reg
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                distributed.reduce_gradients(alphas)
                optimizer.step()
                if on_step is not None:
                    on_step()
    synchronize(device)
    train_seconds = time.perf_counter() - start
    for q in quantizers:
        q.harden()
    result = UnitResult(name, rtn_loss, unit_loss(unit, inputs, targets, device), config.iters if alphas else 0, train_seconds)
    logger.debug("unit %s: rec loss RTN %.4g -> AdaRound %.4g", name, result.rtn_loss, result.loss)
    return result


def harden_remaining(model: nn.Module, config: AdaRoundConfig | None = None) -> int:
    """Give every layer still on a plain weight quantizer AdaRound's structure with nearest rounding
    (``h = frac`` hardened), so the model's structure matches ``rebuild_adaround``. Returns the count."""
    count = 0
    for layer in quant_layers(model).values():
        if all(isinstance(q, AdaRoundQuantizer) for q in layer.weight_quantizers()):
            continue
        for q in convert_layer(layer, soft=True, config=config):
            q.harden()
        count += 1
    return count


def rebuild_adaround(model: nn.Module) -> None:
    """``Stage.rebuild``: hard ``AdaRoundQuantizer``s on every layer (filled by the checkpoint that follows)."""
    for layer in quant_layers(model).values():
        convert_layer(layer, soft=False)


def estimate_seconds(model: nn.Module, calib: CalibrationSet, units: list[str], parts: list[torch.Tensor],
                     config: BrecqConfig, device: torch.device, capture_batch_size: int) -> tuple[float, float]:
    """``(capture, iterations)``: seconds ``reconstruct`` will spend capturing each unit's inputs and targets (and
    measuring its loss) and running its AdaRound iterations, on this device.

    Measured, not modelled from FLOPs: one timed forward of a capture batch with a hook at the start and end of
    every unit gives each unit's capture cost (a capture runs the model up to the unit's input, or its output), and
    timed forward/backward passes of the whole model at the reconstruction batch size stand for one iteration of
    all units together (each unit's forward and backward, once)."""
    if not units:
        return 0.0, 0.0
    rows = sum(len(p) for p in parts)
    first = parts[0]
    batch = first[:capture_batch_size]
    marks: dict[str, list[float]] = {}
    hooks = []
    clock = [0.0]

    def mark(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            synchronize(device)
            marks.setdefault(name, []).append(time.perf_counter() - clock[0])
        return hook

    for name in units:
        module = model.get_submodule(name)
        hooks += [module.register_forward_pre_hook(mark(name)), module.register_forward_hook(mark(name))]
    kwargs = calib.model_kwargs(batch, device)
    per_batch = float("inf")
    try:
        with torch.no_grad(), quant_state(model, weight=True, act=False):
            model(**kwargs)  # warm-up
            for _ in range(3):  # the fastest of three: a busy machine's hiccups must not inflate the estimate
                marks.clear()
                synchronize(device)
                clock[0] = time.perf_counter()
                model(**kwargs)
                # inputs: forward up to the unit's start; targets: up to its end; the loss before and after: the
                # unit twice
                per_batch = min(per_batch, sum(m[0] + m[-1] + 2 * (m[-1] - m[0]) for m in marks.values()))
    finally:
        for h in hooks:
            h.remove()
    capture = per_batch * rows / len(batch)

    with quant_state(model, weight=True, act=False):
        iteration = forward_backward_seconds(model, calib, first[: config.batch_size], device)
    return capture, iteration * config.iters


def estimate_reconstruction(model: nn.Module, calib: CalibrationSet, config: BrecqConfig, *, device: torch.device,
                            batch_size: int, seed: int = 0) -> tuple[list[tuple[int, str]], list[torch.Tensor], float, float]:
    """What ``reconstruct`` will do and how long it will take: its units ``(seed offset, name)`` (those holding
    quantized layers, forward order), the rows per timestep, and ``estimate_seconds``' ``(capture, iterations)``."""
    parts = _select_rows(model, calib, config.max_samples, seed)
    # the offset counts every unit, as it always has
    units = [(number, name) for number, name in enumerate(reconstruction_units(model, calib, device))
             if any(isinstance(m, QuantLayerMixin) for m in model.get_submodule(name).modules())]
    capture_s, iterations_s = estimate_seconds(model, calib, [n for _, n in units], parts, config, device,
                                               config.capture_batch_size or batch_size)
    return units, parts, capture_s, iterations_s


def reconstruct(
    model: nn.Module,
    calib: CalibrationSet,
    config: BrecqConfig | None = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    parts: StageProgress | None = None,
) -> list[UnitResult]:
    """BRECQ/AdaRound weight reconstruction of a prepared ``model`` whose weight quantizers are initialised.

    Returns one ``UnitResult`` per unit (forward order). Afterwards every weight quantizer is a hard
    ``AdaRoundQuantizer``. With ``parts`` every finished unit is kept there as it finishes, and units it already
    holds are restored instead of reconstructed: a killed run resumes at its first unfinished unit and ends
    bit-exactly where an uninterrupted run does (each unit draws from its own seed, and its inputs are captured
    from the units before it, restored exactly).
    """
    config = config or BrecqConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    storage = torch.device("cpu") if config.storage == "cpu" else device
    dtype = _DTYPES[config.storage_dtype]
    capture_bs = config.capture_batch_size or batch_size
    started = time.perf_counter()
    units, rows, capture_s, iterations_s = estimate_reconstruction(model, calib, config, device=device,
                                                                    batch_size=batch_size, seed=seed)
    estimate = capture_s + iterations_s
    logger.info("BRECQ/AdaRound: %d units x %d iterations on %d rows: about %s on this device (capturing %s, "
                "iterations %s; from timed passes of the model)", len(units), config.iters, sum(len(p) for p in rows),
                format_seconds(estimate), format_seconds(capture_s), format_seconds(iterations_s))
    done = sum(parts.notes(name) is not None for _, name in units) if parts is not None else 0
    if done:
        logger.info("BRECQ/AdaRound: %d of %d units finished in an earlier run: resuming after them", done, len(units))
    results: list[UnitResult] = []
    # the bar counts units and moves inside each: its capture, then every iteration, weighted by the estimate's
    # split, so its rate and remaining time follow the real work (capture dominates on large calibration sets)
    capture_share = capture_s / estimate if estimate > 0 else 0.5
    step_share = (1 - capture_share) / max(config.iters, 1)
    bar = tqdm(total=len(units), desc="BRECQ/AdaRound", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.2f}/{total} units [{elapsed}<{remaining}{postfix}]")
    with quant_state(model, weight=True, act=False):
        for position, (number, name) in enumerate(units):
            unit = model.get_submodule(name)
            notes = parts.notes(name) if parts is not None else None
            if notes is not None:  # finished by an earlier, killed run
                assert parts is not None
                for layer in unit.modules():
                    if isinstance(layer, QuantLayerMixin):
                        convert_layer(layer, soft=False, config=config.adaround)
                parts.load(name, unit)
                results.append(UnitResult(**notes))
                bar.update(position + 1 - bar.n)
                bar.set_postfix_str(f"{name}: resumed")
                continue
            bar.set_postfix_str(f"{name}: capturing")
            start = time.perf_counter()
            kwargs = {"device": device, "batch_size": capture_bs, "storage": storage, "dtype": dtype}
            inputs = capture(model, unit, calib, rows, what="input", **kwargs)
            with quant_state(model, weight=False, act=False):
                targets = capture(model, unit, calib, rows, what="output", **kwargs)
            synchronize(device)
            captured = time.perf_counter() - start
            bar.update(capture_share)
            bar.set_postfix_str(f"{name}: {config.iters} iterations")
            result = reconstruct_unit(unit, inputs, targets, config, device=device, seed=seed + number, name=name,
                                      on_step=lambda: bar.update(step_share))
            bar.update(position + 1 - bar.n)  # exactly one unit further, whatever the rounding
            result.capture_seconds = captured
            result.seconds = time.perf_counter() - start
            results.append(result)
            if parts is not None:
                parts.save(name, unit, dataclasses.asdict(result))
            bar.set_postfix_str(f"{name}: {result.rtn_loss:.3g} -> {result.loss:.3g}")
            del inputs, targets
    bar.close()
    logger.info("BRECQ/AdaRound: took %s (estimated %s)", format_seconds(time.perf_counter() - started),
                format_seconds(estimate))
    remaining = harden_remaining(model, config.adaround)
    if remaining:
        logger.info("%d layers were not called by the forward: nearest rounding", remaining)
    improved = sum(r.loss < r.rtn_loss for r in results)
    logger.info("BRECQ: %d units, AdaRound beat round-to-nearest on %d", len(results), improved)
    return results
