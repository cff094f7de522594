"""Block-diagonal randomized Hadamard rotation of a layer's input channels (QuaRot / ConvRot style).

``R = diag(D_1 H, D_2 H, ...)`` with ``H`` the normalized Walsh-Hadamard matrix of size ``block`` (symmetric,
``H H = I``) and ``D_j`` diagonal ±1 signs drawn from a fixed seed, so ``R`` is orthogonal and reproducible from
``(channels, block, seed)``. The signs come first so that structured inputs (e.g. a channel-constant vector, which
``H`` alone maps onto one coefficient) still spread over the block. A linear or convolution layer is linear in its
input channels, so ``x -> x R`` on every pixel/token together with ``W -> W R`` on the weight's input-channel axis
leaves its float output unchanged, while the rotated activation has no outlier channels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROTATION_SEED = 0


def hadamard(block: int) -> torch.Tensor:
    """Walsh-Hadamard matrix ``[block, block]`` of ±1 (Sylvester construction; ``block`` a power of two); the
    orthogonal ``H`` is ``hadamard(block) / sqrt(block)``."""
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    if h.shape[0] != block:
        raise ValueError(f"the Hadamard block size must be a power of two, got {block}")
    return h


def rotation_signs(channels: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """The ±1 signs ``[channels]`` of ``D`` (a CPU generator: the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (channels,), generator=g).float() * 2 - 1


class ChannelRotation(nn.Module):
    """``x -> x R`` along the channel dim ``dim`` of ``x`` (``-1`` for token inputs ``[..., C]``, ``1`` for conv
    inputs ``[N, C, ...]``). Buffers ``signs [C]`` and ``hadamard [b, b]`` (±1: exact in every dtype; the
    ``1 / sqrt(b)`` is applied after the matmul) are rebuilt from ``(channels, block, seed)``, hence non-persistent
    (fake-quant checkpoints stay unchanged; deployed ones store every buffer)."""

    def __init__(self, channels: int, block: int, dim: int, seed: int = ROTATION_SEED) -> None:
        super().__init__()
        if channels % block:
            raise ValueError(f"cannot rotate {channels} channels in blocks of {block}: not a multiple")
        self.channels, self.block, self.dim, self.seed = channels, block, dim, seed
        self.register_buffer("signs", rotation_signs(channels, seed), persistent=False)
        self.register_buffer("hadamard", hadamard(block), persistent=False)

    def rotate(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its axis ``dim`` (of size ``channels``) multiplied by ``R``."""
        moved = x.movedim(dim, -1) * self.signs.to(x.dtype)
        rotated = (moved.unflatten(-1, (-1, self.block)) @ self.hadamard.to(x.dtype)).flatten(-2)
        return (rotated * self.block**-0.5).movedim(-1, dim)

    def unrotate(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its axis ``dim`` multiplied by ``R^T = R^-1`` (``H D / sqrt(b)`` per block): undoes ``rotate``."""
        moved = x.movedim(dim, -1)
        back = (moved.unflatten(-1, (-1, self.block)) @ self.hadamard.to(x.dtype)).flatten(-2)
        return (back * self.signs.to(x.dtype) * self.block**-0.5).movedim(-1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x, self.dim)

    def spec(self) -> dict[str, Any]:
        """JSON-able description (enough to rebuild it)."""
        return {"channels": self.channels, "block": self.block, "dim": self.dim, "seed": self.seed}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, block={self.block}, seed={self.seed}"
