"""A DDPM-tutorial-style denoiser (no diffusers modules), trained in seconds on synthetic images.

Like the popular from-scratch DDPM tutorials: the timestep ``t`` (shape ``[N, 1]``, int64) goes through an
``nn.Embedding`` holding a frozen sinusoid table, each block adds its own small time MLP of it to its input, blocks are
``LayerNorm -> Conv -> SiLU -> Conv -> SiLU``, down-sampling is a strided conv and up-sampling a ``ConvTranspose2d``.
Trained to predict the noise, its activations grow as ``t -> 0`` (it amplifies ``x_t - x_0`` by ``1 / sigma_t``), so
static ranges of a timestep clip those of the cleaner timesteps after it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

TRAIN_STEPS = 1000
SIZE = 16


def sinusoid_table(steps: int, dim: int) -> torch.Tensor:
    """``[steps, dim]``: ``sin`` in the even and ``cos`` in the odd columns of ``t / 10000^(2i / dim)``."""
    t = torch.arange(steps, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(steps, dim)
    table[:, 0::2] = torch.sin(t * freqs)
    table[:, 1::2] = torch.cos(t * freqs)
    return table


def time_mlp(emb_dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(emb_dim, out), nn.SiLU(), nn.Linear(out, out))


class Block(nn.Module):
    """``x + te(t)`` -> LayerNorm over ``[C, H, W]`` -> conv -> SiLU -> conv -> SiLU."""

    def __init__(self, shape: tuple[int, int, int], out: int, emb_dim: int) -> None:
        super().__init__()
        self.te = time_mlp(emb_dim, shape[0])
        self.norm = nn.LayerNorm(shape)
        self.conv1 = nn.Conv2d(shape[0], out, 3, padding=1)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.te(emb).reshape(len(x), -1, 1, 1))
        return F.silu(self.conv2(F.silu(self.conv1(h))))


class TutorialUNet(nn.Module):
    """``forward(x [N, 1, 16, 16], t [N, 1] int64) -> eps [N, 1, 16, 16]``; two levels, skip concatenations."""

    def __init__(self, channels: int = 16, emb_dim: int = 32) -> None:
        super().__init__()
        c = channels
        self.time_embed = nn.Embedding(TRAIN_STEPS, emb_dim)
        self.time_embed.weight.data = sinusoid_table(TRAIN_STEPS, emb_dim)
        self.time_embed.requires_grad_(False)
        self.b1 = Block((1, SIZE, SIZE), c, emb_dim)
        self.down1 = nn.Conv2d(c, c, 4, 2, 1)
        self.b2 = Block((c, SIZE // 2, SIZE // 2), 2 * c, emb_dim)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 4, 2, 1)
        self.mid = Block((2 * c, SIZE // 4, SIZE // 4), 2 * c, emb_dim)
        self.up1 = nn.ConvTranspose2d(2 * c, 2 * c, 4, 2, 1)
        self.b3 = Block((4 * c, SIZE // 2, SIZE // 2), c, emb_dim)
        self.up2 = nn.ConvTranspose2d(c, c, 4, 2, 1)
        self.b4 = Block((2 * c, SIZE, SIZE), c, emb_dim)
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t).reshape(len(x), -1)
        h1 = self.b1(x, emb)
        h2 = self.b2(self.down1(h1), emb)
        h = self.mid(self.down2(h2), emb)
        h = self.b3(torch.cat([self.up1(h), h2], dim=1), emb)
        h = self.b4(torch.cat([self.up2(h), h1], dim=1), emb)
        return self.out(h)


def synthetic_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 1, 16, 16]`` in ``[-1, 1]``: one bright soft-edged rectangle per image on a dark background."""
    grid = torch.arange(SIZE, dtype=torch.float32)
    lo = torch.randint(1, SIZE // 2, (n, 2), generator=generator).float()
    hi = lo + torch.randint(4, SIZE // 2, (n, 2), generator=generator).float()
    rows = torch.sigmoid(2 * (grid - lo[:, :1])) * torch.sigmoid(2 * (hi[:, :1] - grid))
    cols = torch.sigmoid(2 * (grid - lo[:, 1:])) * torch.sigmoid(2 * (hi[:, 1:] - grid))
    return (2 * rows[:, :, None] * cols[:, None, :] - 1)[:, None]


def scheduler() -> DDIMScheduler:
    """The tutorial's linear beta schedule (1e-4 .. 0.02 over 1000 steps) as a DDIM sampler."""
    return DDIMScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def train(steps: int = 300, batch: int = 64, seed: int = 0, images=synthetic_images) -> TutorialUNet:
    """A ``TutorialUNet`` trained ``steps`` Adam steps on the noise-prediction loss (``images(n, generator)``)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TutorialUNet()
    alphas = scheduler().alphas_cumprod
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(steps):
        x0 = images(batch, generator)
        t = torch.randint(0, TRAIN_STEPS, (batch, 1), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].reshape(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def sample(model: nn.Module, sampler, steps: int, n: int = 8, seed: int = 0, trajectory: bool = False):
    """Sample ``n`` images with any diffusers ``sampler`` in ``steps`` steps, calling ``model(x, t [N, 1])``; with
    ``trajectory`` return every step's ``x`` stacked ``[steps + 1, n, 1, 16, 16]``."""
    sampler.set_timesteps(steps)
    x = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * sampler.init_noise_sigma
    xs = [x]
    for t in sampler.timesteps:
        eps = model(sampler.scale_model_input(x, t), t.round().long().expand(n, 1) if t.is_floating_point() else t.expand(n, 1))
        x = sampler.step(eps, t, x).prev_sample
        xs.append(x)
    return torch.stack(xs) if trajectory else x
