"""Generic training loop of the zoo: AdamW, warmup + cosine decay, bf16 autocast on GPU, EMA weights, logging,
periodic samples and resumable, atomically written checkpoints.

The schedule's progress is ``max(step / steps, elapsed / time_budget_s)``, so a run with a wall-clock budget still
anneals its learning rate and ends on time.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training stage (``ema_decay=None``: no EMA, the raw weights are saved)."""

    steps: int
    batch_size: int
    lr: float
    time_budget_s: float | None = None
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    ema_decay: float | None = 0.9995
    grad_clip: float = 1.0
    log_every: int = 100
    checkpoint_every: int = 1000
    sample_every: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size and lr must be positive, got {self}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {self.ema_decay}")

    def updated(self, **changes: object) -> TrainConfig:
        """A copy with the non-``None`` ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class TrainResult:
    """What a stage produced: the EMA model (or the raw one without EMA) and its training record."""

    model: nn.Module
    steps: int
    seconds: float
    final_loss: float
    config: TrainConfig


LossFn = Callable[[nn.Module, int], torch.Tensor]
SampleFn = Callable[[nn.Module, int], None]


class Trainer:
    """Trains ``model`` on ``device`` with losses from ``loss_fn(model, step)``; checkpoints go to
    ``run_dir/checkpoints/<stage>.pt``."""

    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: Path, stage: str, device: torch.device) -> None:
        self.model = model.to(device).train()
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
        self.config = config
        self.stage = stage
        self.device = device
        self.checkpoint_path = Path(run_dir) / "checkpoints" / f"{stage}.pt"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if config.ema_decay else None
        self.step = 0
        self.elapsed = 0.0
        self.recent_losses: list[float] = []

    def _progress(self) -> float:
        budget = self.config.time_budget_s
        return max(self.step / self.config.steps, self.elapsed / budget if budget else 0.0)

    def _lr(self) -> float:
        cfg = self.config
        if self.step < cfg.warmup_steps:
            return cfg.lr * (self.step + 1) / cfg.warmup_steps
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, self._progress())))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

    def _done(self) -> bool:
        return self._progress() >= 1.0

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        for ema_buf, buf in zip(self.ema.buffers(), self.model.buffers()):
            ema_buf.copy_(buf)

    def save_checkpoint(self) -> None:
        """Writes the full training state to a temporary file, then renames it over the checkpoint."""
        state = {
            "stage": self.stage,
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "recent_losses": self.recent_losses,
            "config": asdict(self.config),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        """Restores the state of an earlier run of this stage; False when there is no checkpoint."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.recent_losses = state["step"], state["elapsed"], state["recent_losses"]
        torch.set_rng_state(state["cpu_rng"].cpu())
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        log.info("%s: resumed from %s at step %d (%.0f s trained)", self.stage, self.checkpoint_path, self.step,
                 self.elapsed)
        return True

    def fit(self, loss_fn: LossFn, sample_fn: SampleFn | None = None, resume: bool = False) -> TrainResult:
        """Runs until ``steps`` or the time budget is reached; returns the EMA (or raw) model."""
        cfg = self.config
        if not (resume and self.load_checkpoint()):
            torch.manual_seed(cfg.seed)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        window = torch.zeros((), device=self.device)
        window_steps, start = 0, time.perf_counter() - self.elapsed
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, disable=None, mininterval=5)
        while not self._done():
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            with autocast:
                loss = loss_fn(self.model, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self._update_ema()
            self.step += 1
            self.elapsed = time.perf_counter() - start
            window += loss.detach().float()
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self._done():
                mean = window.item() / window_steps
                self.recent_losses = (self.recent_losses + [mean])[-10:]
                bar.set_postfix(loss=f"{mean:.4f}")
                log.info("%s: step %d/%d loss %.4f lr %.2e %.1f it/s elapsed %.0f s", self.stage, self.step,
                         cfg.steps, mean, self._lr(), self.step / max(self.elapsed, 1e-9), self.elapsed)
                window.zero_()
                window_steps = 0
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if sample_fn is not None and self.step % cfg.sample_every == 0:
                sample_fn(self.result_model(), self.step)
                self.model.train()
        bar.close()
        self.save_checkpoint()
        if sample_fn is not None:
            sample_fn(self.result_model(), self.step)
        final = self.recent_losses[-1] if self.recent_losses else float("nan")
        return TrainResult(self.result_model(), self.step, self.elapsed, final, cfg)

    def result_model(self) -> nn.Module:
        """The EMA model when EMA is on, else the trained model, in eval mode."""
        return self.ema if self.ema is not None else self.model.eval()
