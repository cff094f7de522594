"""Teacher-student finetuning shared by TLA and CMA (spec §2.8, §3.3): one engine, two objectives.

The FP teacher is the same prepared model with quantization off (layers whose weights train keep an FP copy, so
the teacher always runs the original weights). Each step takes a batch of calibration rows (of one timestep, or of
several with ``order="mixed"``: each sample then reads its own timestep's activation-scale row), runs the teacher under ``no_grad`` (or reads its cached outputs) and the
fully quantized student, and minimises

    loss = local_weight * sum_k MSE(student_k, teacher_k) + global_weight * MSE(student_out, teacher_out)

over the outputs of the hooked layers ``k`` and the denoiser output. Weights and biases of the chosen layers get
straight-through gradients through their frozen weight quantizers (Adam); the active row of the chosen activation
scales is trained with ``RowAdam``. Batches come from a ``plan``: timesteps shuffled per epoch by default (the
code's sequential sweeps and the all-timesteps-per-batch ``"mixed"`` order are available). Nothing is written to disk.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..nn import ActQuantizer
from ..prepare import act_quantizers, handle, quant_layers, quant_state, weight_quantizers
from .common import autocast, frozen_quantized_weights, output_tensor, trainable_only
from .data import CalibrationSet
from .row_adam import RowAdam
from .timing import StepClock, forward_backward_seconds, forward_seconds

logger = logging.getLogger(__name__)

Order = Literal["shuffled", "sequential", "timestep_major", "mixed"]
ORDERS = ("shuffled", "sequential", "timestep_major", "mixed")


@dataclass
class Objective:
    """What a finetuning stage trains and how its loss is assembled.

    Attributes:
        weight_layers: quantized layers whose ``weight`` and ``bias`` train.
        act_quantizers: activation quantizers whose active row of ``scale`` trains.
        hooked_layers: layers whose outputs enter the local MSE terms.
        local_weight / global_weight: weights of the summed local MSEs and of the output MSE.
    """

    weight_layers: list[str]
    act_quantizers: dict[str, ActQuantizer]
    hooked_layers: list[str]
    local_weight: float
    global_weight: float

    def __post_init__(self) -> None:
        if self.local_weight < 0 or self.global_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if (self.local_weight == 0 or not self.hooked_layers) and self.global_weight == 0:
            raise ValueError("the finetuning loss is empty: enable the global loss or a local term on hooked layers")
        if not self.weight_layers and not self.act_quantizers:
            raise ValueError("nothing to finetune: no layer weights and no activation scales were selected")


@dataclass(frozen=True)
class Batch:
    """Calibration rows ``index`` covering the quantizer rows ``rows`` (one timestep's row, or every timestep's in
    a ``"mixed"`` plan); ``visit`` numbers the (epoch, timestep) visit the batch belongs to (the epoch when mixed)."""

    rows: tuple[int, ...]
    index: torch.Tensor
    visit: int


@dataclass
class FinetuneResult:
    """Per-step training losses and the stage's own loss on its evaluation batches before and after."""

    losses: list[float] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")

    def summary(self) -> dict[str, float | int | None]:
        """JSON-safe summary (``None`` for losses that were not measured)."""
        def safe(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"loss_before": safe(self.loss_before), "loss_after": safe(self.loss_after), "steps": len(self.losses)}


# -- plans ---------------------------------------------------------------------------------------------------------
def plan_batches(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    samples_per_t: int,
    epochs: int,
    batch_size: int,
    resample: bool,
    order: Order,
    generator: torch.Generator,
    timesteps: tuple[float, ...] | None = None,
) -> list[Batch]:
    """The training batches of one stage: rows of one timestep each, or of every timestep with ``"mixed"``.

    Per timestep, ``samples_per_t`` rows are drawn (once, or afresh for every epoch with ``resample``) and cut into
    ``batch_size`` chunks. ``order``: ``"shuffled"`` visits the timesteps in a new random order every epoch
    (default); ``"sequential"`` visits them noisiest first every epoch (the code's CMA); ``"timestep_major"`` runs all
    epochs of one timestep before the next (the code's TLA); ``"mixed"`` puts the k-th chunk of every timestep into
    one batch (``batch_size`` rows per timestep per step: T times fewer, fuller steps; each scale row still gets
    one update per chunk, the shared weights one per step instead of T).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: use one of {ORDERS}")
    schedule = handle(model).schedule
    wanted = calib.timesteps
    if timesteps is not None:
        chosen = {float(t) for t in timesteps}
        missing = chosen - set(wanted)
        if missing:
            raise ValueError(f"timesteps {sorted(missing)} are not calibrated (calibrated: {calib.timesteps})")
        wanted = [t for t in wanted if t in chosen]
    pools = {t: torch.nonzero(calib.ts == t).flatten() for t in wanted}

    def draw(t: float) -> list[torch.Tensor]:
        pool = pools[t]
        pick = pool[torch.randperm(len(pool), generator=generator)[:samples_per_t]]
        return list(pick.split(batch_size))

    fixed = {t: draw(t) for t in wanted} if not resample else {}
    plan: list[Batch] = []
    if order == "mixed":
        for epoch in range(epochs):
            chunks = {t: draw(t) if resample else fixed[t] for t in wanted}
            for k in range(max(len(c) for c in chunks.values())):
                present = [t for t in wanted if k < len(chunks[t])]
                batch_rows = tuple(sorted({schedule.index(t) for t in present}))
                plan.append(Batch(batch_rows, torch.cat([chunks[t][k] for t in present]), epoch))
        return plan
    visits: list[tuple[int, float]] = []
    if order == "timestep_major":
        visits = [(e, t) for t in wanted for e in range(epochs)]
    else:
        for e in range(epochs):
            ts = [wanted[i] for i in torch.randperm(len(wanted), generator=generator)] if order == "shuffled" else wanted
            visits += [(e, t) for t in ts]
    for visit, (_, t) in enumerate(visits):
        for chunk in (draw(t) if resample else fixed[t]):
            plan.append(Batch((schedule.index(t),), chunk, visit))
    return plan


def evaluation_batches(model: nn.Module, calib: CalibrationSet, samples_per_t: int, batch_size: int,
                       generator: torch.Generator, timesteps: tuple[float, ...] | None = None,
                       mixed: bool = False) -> list[Batch]:
    """A fixed set of ``samples_per_t`` rows per timestep (for before/after loss reports); ``mixed`` batches
    across timesteps (same rows, fewer forwards). A generator seeded like a training plan's (same ``samples_per_t``,
    no resampling) gives that plan's first-epoch rows."""
    return plan_batches(model, calib, samples_per_t=samples_per_t, epochs=1, batch_size=batch_size, resample=False,
                        order="mixed" if mixed else "sequential", generator=generator, timesteps=timesteps)


def plan_seconds(model: nn.Module, calib: CalibrationSet, plan: list[Batch], device: torch.device) -> float:
    """Seconds ``finetune`` will spend on ``plan`` on this device: its step count times one timed step on this rank's
    share of the first batch (a forward and backward of the quantized model, plus the teacher's forward)."""
    if not plan:
        return 0.0
    index, _ = distributed.batch_share(plan[0].index)
    if not len(index):
        return 0.0
    step = forward_backward_seconds(model, calib, index, device)
    with quant_state(model, weight=False, act=False):
        step += forward_seconds(model, calib, index, device)
    return step * len(plan)


# -- teacher bookkeeping ---------------------------------------------------------------------------------------------
def keep_teacher_copies(model: nn.Module, layer_names: list[str]) -> None:
    """Snapshot the current weights of ``layer_names`` as the FP teacher's, unless a snapshot exists."""
    layers = quant_layers(model)
    for name in layer_names:
        if layers[name].fp_weight is None:
            layers[name].keep_fp_copy()


def release_teacher_copies(model: nn.Module) -> None:
    """Drop every FP weight snapshot (when no later stage needs the teacher)."""
    for layer in quant_layers(model).values():
        layer.drop_fp_copy()


# -- loss ----------------------------------------------------------------------------------------------------------
class OutputRecorder:
    """Forward hooks keeping the outputs of some layers, call by call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self._handles = [
            model.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: self.outputs[n].append(output_tensor(out)))
            for n in names
        ]

    def take(self) -> dict[str, list[torch.Tensor]]:
        out = self.outputs
        self.outputs = {n: [] for n in out}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def assemble_loss(
    objective: Objective,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    student_locals: dict[str, list[torch.Tensor]],
    teacher_locals: dict[str, list[torch.Tensor]],
) -> torch.Tensor:
    """``local_weight * sum_k MSE_k + global_weight * MSE_out`` (float32 scalar)."""
    loss = torch.zeros((), device=student_out.device)
    if objective.local_weight > 0:
        for name in objective.hooked_layers:
            for s, t in zip(student_locals[name], teacher_locals[name]):
                loss = loss + objective.local_weight * F.mse_loss(s.float(), t.float())
    if objective.global_weight > 0:
        loss = loss + objective.global_weight * F.mse_loss(student_out.float(), teacher_out.float())
    return loss


class _Forwards:
    """Teacher and student forwards of one batch, with the recorder and an optional teacher cache."""

    def __init__(self, model: nn.Module, calib: CalibrationSet, objective: Objective, device: torch.device,
                 use_autocast: bool, cache: bool) -> None:
        self.model, self.calib, self.objective, self.device = model, calib, objective, device
        self.use_autocast = use_autocast
        self.cache: dict[tuple[int, ...], tuple[torch.Tensor, dict[str, list[torch.Tensor]]]] | None = {} if cache else None
        hooked = objective.hooked_layers if objective.local_weight > 0 else []
        self.recorder = OutputRecorder(model, hooked)
        # quantizer lists gathered once: switching per step must not walk the module tree (launch-bound GPU steps)
        self._weight_q = list(weight_quantizers(model).values())
        self._act_q = list(act_quantizers(model).values())

    @contextlib.contextmanager
    def _quant(self, on: bool) -> Iterator[None]:
        """All quantizers on (student) or off (teacher) for the block; previous flags restored."""
        previous = [q.enabled for q in self._weight_q] + [q.enabled for q in self._act_q]
        for q in self._weight_q:
            q.enabled = on
        for q in self._act_q:
            q.enabled = on
        try:
            yield
        finally:
            for q, flag in zip([*self._weight_q, *self._act_q], previous):
                q.enabled = flag

    def teacher(self, batch: Batch) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        key = tuple(batch.index.tolist())
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        with torch.no_grad(), self._quant(False), autocast(self.device, self.use_autocast):
            out = output_tensor(self.model(**self.calib.model_kwargs(batch.index, self.device))).detach()
        result = (out, {k: [v.detach() for v in vs] for k, vs in self.recorder.take().items()})
        if self.cache is not None:
            self.cache[key] = result
        return result

    def loss(self, batch: Batch) -> torch.Tensor:
        teacher_out, teacher_locals = self.teacher(batch)
        with self._quant(True), autocast(self.device, self.use_autocast):
            out = output_tensor(self.model(**self.calib.model_kwargs(batch.index, self.device)))
        return assemble_loss(self.objective, out, teacher_out, self.recorder.take(), teacher_locals)

    def close(self) -> None:
        self.recorder.remove()


@torch.no_grad()
def evaluate(model: nn.Module, calib: CalibrationSet, objective: Objective, batches: list[Batch], *,
             device: torch.device, use_autocast: bool = False) -> float:
    """Mean loss of ``objective`` over ``batches`` (weighted by batch size); changes nothing."""
    total, count = 0.0, 0
    with contextlib.closing(_Forwards(model, calib, objective, device, use_autocast, cache=False)) as f, \
            frozen_quantized_weights(model, []):
        for batch in batches:
            total += float(f.loss(batch)) * len(batch.index)
            count += len(batch.index)
    return total / max(count, 1)


def finetune(
    model: nn.Module,
    calib: CalibrationSet,
    objective: Objective,
    plan: list[Batch],
    *,
    weight_lr: float,
    act_lr: float,
    device: torch.device,
    use_autocast: bool = False,
    cache_teacher: bool = False,
    reset_act_state: bool = False,
    progress: bool = True,
    desc: str = "finetune",
) -> list[float]:
    """Run ``plan`` and return the per-step losses.

    ``cache_teacher`` keeps teacher outputs per batch in memory (for plans that repeat batches); ``reset_act_state``
    gives every (epoch, timestep) visit a fresh Adam state for its scale row (the code's CMA). In a process group
    each rank runs its block of every batch and the gradients are summed over ranks (``distributed``).
    """
    layers = quant_layers(model)
    keep_teacher_copies(model, objective.weight_layers)
    weights = [p for n in objective.weight_layers for p in (layers[n].weight, layers[n].bias) if p is not None]
    scales = list({id(q.scale): q.scale for q in objective.act_quantizers.values()}.values())
    weight_opt = torch.optim.Adam(weights, lr=weight_lr) if weights else None
    scale_opt = RowAdam(scales, lr=act_lr) if scales else None
    losses: list[torch.Tensor] = []  # kept on the device: no host sync per step
    last_visit = -1
    bar = tqdm(plan, desc=desc, unit="step", disable=not progress)
    clock = StepClock(desc, len(plan))
    with contextlib.closing(_Forwards(model, calib, objective, device, use_autocast, cache_teacher)) as f, \
            trainable_only(model, weights + scales), frozen_quantized_weights(model, objective.weight_layers), \
            torch.enable_grad():
        for step, batch in enumerate(bar):
            if scale_opt is not None and reset_act_state and batch.visit != last_visit:
                scale_opt.reset(batch.rows)
            last_visit = batch.visit
            # this rank's block of the batch (all of it in one process); gradients and loss are summed over ranks
            index, share = distributed.batch_share(batch.index)
            loss = f.loss(replace(batch, index=index)) if len(index) else None
            if loss is not None and share != 1.0:
                loss = loss * share
            if weight_opt is not None:
                weight_opt.zero_grad(set_to_none=True)
            if scale_opt is not None:
                scale_opt.zero_grad()
            if loss is not None:
                loss.backward()
            loss = distributed.reduce_gradients(weights + scales, loss)
            if weight_opt is not None:
                weight_opt.step()
            if scale_opt is not None:
                scale_opt.step(batch.rows)
            losses.append(loss.detach())
            clock.tick(step, device)
            if progress and step % 25 == 0:
                bar.set_postfix(loss=f"{float(losses[-1]):.4g}")
    clock.done()
    return torch.stack(losses).tolist() if losses else []
