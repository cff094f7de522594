"""Small helpers shared by the calibration algorithms (BRECQ, TLA/CMA finetuning, sensitivity)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..prepare import handle, quant_layers
from .data import CalibrationSet


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a module output: a tensor, diffusers' ``.sample``, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; the denoiser must return a tensor, "
                    "a tuple starting with one, or an object with a .sample tensor")


def generator(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for ``seed`` and a per-algorithm ``salt`` (so stages draw independent streams)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))


def rows_by_quantizer_row(model: nn.Module, calib: CalibrationSet, timesteps: Iterable[float] | None = None) -> dict[int, list[torch.Tensor]]:
    """Calibration row indices grouped by the activation-quantizer row their timestep maps to.

    Returns ``{row: [indices of timestep t1, indices of t2, ...]}`` in calibration order (noisiest first); with one
    shared row (``timestep_aware=False``) every timestep lands in row 0, each as its own entry. ``timesteps``
    restricts the result to those calibrated timesteps.
    """
    schedule = handle(model).schedule
    wanted = None if timesteps is None else {float(t) for t in timesteps}
    if wanted is not None:
        unknown = wanted - set(calib.timesteps)
        if unknown:
            raise ValueError(f"timesteps {sorted(unknown)} are not in the calibration data (it has {calib.timesteps})")
    groups: dict[int, list[torch.Tensor]] = {}
    for t in calib.timesteps:
        if wanted is not None and t not in wanted:
            continue
        groups.setdefault(schedule.index(t), []).append(torch.nonzero(calib.ts == t).flatten())
    return groups


def timestep_batches(model: nn.Module, calib: CalibrationSet, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(quantizer row, row indices)`` batches that never mix timesteps, in calibration order."""
    for row, parts in rows_by_quantizer_row(model, calib).items():
        for part in parts:
            for chunk in part.split(batch_size):
                yield row, chunk


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block only ``params`` require grad (so backward skips everything else); flags restored after."""
    keep = {id(p) for p in params}
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


@contextlib.contextmanager
def frozen_quantized_weights(model: nn.Module, trained: Iterable[str]) -> Iterator[None]:
    """Within the block every quantized layer except ``trained`` runs on a fake-quantized weight computed once
    (their weights are frozen, so it cannot change): fewer kernels per finetuning step."""
    keep = set(trained)
    frozen = [layer for name, layer in quant_layers(model).items() if name not in keep]
    for layer in frozen:
        layer.freeze_quantized_weight()
    try:
        yield
    finally:
        for layer in frozen:
            layer.thaw_quantized_weight()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``enabled``; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def layers_with_roles(model: nn.Module, roles: Iterable[str]) -> list[str]:
    """Names of the quantized layers playing any of ``roles`` (adapter roles, dotted selectors)."""
    roles = tuple(roles)
    return [name for name, info in handle(model).layers.items() if info.has_role(roles)]
