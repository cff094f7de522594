"""Helpers shared by the calibration tests (synthetic calibration data, per-timestep outputs)."""
from __future__ import annotations

import torch

from questdiff.calibration import CalibrationSet

TIMESTEPS = (900.0, 600.0, 300.0, 50.0)


def synthetic_calibration(rows_per_t: int = 16, timesteps=TIMESTEPS, shape=(1, 16, 16), seed: int = 0,
                          context: tuple[int, int] | None = None) -> CalibrationSet:
    """``rows_per_t`` rows per timestep of N(0, 1) samples (noisiest timestep first); ``context=(tokens, dim)``
    adds ``encoder_hidden_states``."""
    g = torch.Generator().manual_seed(seed)
    n = rows_per_t * len(timesteps)
    inputs = {
        "sample": torch.randn(n, *shape, generator=g),
        "timestep": torch.tensor([float(t) for t in timesteps]).repeat_interleave(rows_per_t),
    }
    if context is not None:
        inputs["encoder_hidden_states"] = torch.randn(n, *context, generator=g)
    steps = torch.arange(len(timesteps)).repeat_interleave(rows_per_t)
    return CalibrationSet(inputs, steps, "sample", "timestep")


def outputs_per_timestep(model, calib: CalibrationSet) -> torch.Tensor:
    """Denoiser outputs for every row, one forward per timestep: ``[N, ...]`` in row order."""
    outs = []
    with torch.no_grad():
        for t in calib.timesteps:
            index = torch.nonzero(calib.ts == t).flatten()
            outs.append((index, model(**calib.model_kwargs(index)).sample))
    result = torch.empty(len(calib), *outs[0][1].shape[1:])
    for index, out in outs:
        result[index] = out
    return result
