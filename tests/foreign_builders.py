"""Tiny hand-written denoisers like third-party ones (no diffusers modules): attention through
``F.scaled_dot_product_attention`` or written out by hand, a timestep MLP; and calibration data for them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from questdiff.calibration import CalibrationSet


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``[B, L, C]`` tokens, by SDPA or (``manual=True``) as ``softmax(q k^T) v``."""

    def __init__(self, channels: int, heads: int, manual: bool = False) -> None:
        super().__init__()
        self.heads, self.manual = heads, manual
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.manual:
            a = (q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5).softmax(dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return h + self.out(a.transpose(1, 2).reshape(b, n, c))


class AttentionDenoiser(nn.Module):
    """Conv in -> attention blocks (the first one runs twice) and one causal SDPA call in the forward itself ->
    conv out. The timestep argument is ``t``, the sample ``x`` (``[B, 1, 8, 8]``)."""

    def __init__(self, channels: int = 16, heads: int = 2, manual: bool = False) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList([SelfAttention(channels, heads, manual), SelfAttention(channels, heads * 2, manual)])
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.manual = manual

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time(t.float().reshape(-1, 1) / 1000)[:, :, None, None]
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        for block in (self.blocks[0], self.blocks[0], self.blocks[1]):
            tokens = block(tokens)
        if not self.manual:
            tokens = tokens + F.scaled_dot_product_attention(tokens[:, None], tokens[:, None], tokens[:, None], is_causal=True)[:, 0]
        h = tokens.transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(F.silu(h))


def foreign_calibration(rows_per_t: int = 4, timesteps=(900.0, 500.0, 100.0), seed: int = 0) -> CalibrationSet:
    """``rows_per_t`` N(0, 1) samples ``x [1, 8, 8]`` per timestep ``t`` (noisiest first)."""
    g = torch.Generator().manual_seed(seed)
    n = rows_per_t * len(timesteps)
    inputs = {"x": torch.randn(n, 1, 8, 8, generator=g), "t": torch.tensor(timesteps).repeat_interleave(rows_per_t)}
    return CalibrationSet(inputs, torch.arange(len(timesteps)).repeat_interleave(rows_per_t), "x", "t")
