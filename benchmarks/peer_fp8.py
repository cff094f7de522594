"""The quality of the peer a user would pick for FP8 (torchao ``Float8DynamicActivationFloat8WeightConfig(PerRow)``:
every ``nn.Linear``, no calibration) as a fake-quant reimplementation, for side-by-side quality tables: each linear
layer's input is quantized to e4m3 per token with a scale computed from that token at run time, its weight per
output row; convolutions stay in floating point, as in torchao."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from questdiff.fp8 import FP8_MAX, fake_quantize_fp8


class DynamicFp8RowLinear(nn.Module):
    """``linear`` with row-wise dynamic e4m3 fake quantization of its input (per token) and weight (per row)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = (x.detach().float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        w = self.linear.weight
        w_scale = (w.detach().float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        return F.linear(fake_quantize_fp8(x, x_scale), fake_quantize_fp8(w, w_scale), self.linear.bias)


def dynamic_fp8_rowwise(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every ``nn.Linear`` runs ``DynamicFp8RowLinear``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            model.set_submodule(name, DynamicFp8RowLinear(module))
    return model
