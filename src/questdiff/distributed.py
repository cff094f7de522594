"""Several processes, one result (DESIGN §7): rank/world helpers, the one sharding rule and the few collectives the
algorithms call. The engine is ``torch.distributed`` (NCCL for GPU tensors, gloo for CPU tensors and pickled
objects), launched by ``torchrun`` (``env://``: it sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

Without a process group every helper is the identity (rank 0 of 1, the whole range, no communication), so a single
process runs exactly the code it ran before any of this existed.

The sharding rule: ``n`` work items (the sampling batches of calibration collection and evaluation, the rows of one
training batch) are cut into ``world`` contiguous, balanced blocks; rank ``r`` takes ``[r * n // world,
(r + 1) * n // world)``. Gathering concatenates the blocks in rank order, which is the one-process order, and
every item is computed exactly as one process computes it (same batch composition, same seeds), so collected data
and samples are bit-identical to one process's. Data-parallel training takes each rank's block of every batch and
sums the gradients of ``share mean loss * share / batch`` over ranks: the gradient of the batch's mean loss, up to
the order of floating-point additions.

This module imports nothing from questdiff, so every layer may call it without an import cycle.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
logger = logging.getLogger(__name__)


def active() -> bool:
    """Whether this process belongs to a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one that writes files and shows progress."""
    return rank() == 0


def launched() -> bool:
    """Whether ``torchrun`` (or another ``env://`` launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(cuda: bool | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment; a no-op (False) outside one.

    With ``cuda`` (default: when a GPU is present) each rank gets its node-local GPU (``LOCAL_RANK``) as the current
    CUDA device, so ``"cuda"`` means that GPU; GPU tensors go through NCCL, CPU tensors and pickled objects through
    gloo. Without, everything goes through gloo.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run one process (no torchrun / --nproc)")
    backend = "gloo"
    if torch.cuda.is_available() if cuda is None else cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started rank {local} on this node but it has {torch.cuda.device_count()} GPU(s): "
                             "use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous block of ``n`` items (the sharding rule; the whole range in one process)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


def sample_batches(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """``(first sample, count)`` of this rank's sampling batches: the one-process batches ``[0, b), [b, 2b), ...``
    cut by ``shard``, so every batch holds exactly the samples it holds in one process."""
    batches = [(start, min(batch_size, num_samples - start)) for start in range(0, num_samples, batch_size)]
    if len(batches) < world_size():
        logger.warning("%d sampling batches for %d ranks: %d ranks idle; use a batch size <= %d", len(batches),
                       world_size(), world_size() - len(batches), max(1, num_samples // world_size()))
    return batches[shard(len(batches))]


def gather(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process). Objects are pickled: use it
    for CPU data (recorded calibration rows, images), not for GPU tensors."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_blocks(block: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's block ``[counts[r], ...]`` of one tensor concatenated in rank order, on every rank (one
    broadcast per rank into the result: no padding, no second copy). ``block`` in one process."""
    if not active():
        return block
    offsets = [0, *itertools.accumulate(counts)]
    out = block.new_empty((offsets[-1], *block.shape[1:]))
    out[offsets[rank()] : offsets[rank() + 1]].copy_(block)
    for r in range(world_size()):
        if counts[r]:
            dist.broadcast(out[offsets[r] : offsets[r + 1]], src=r)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


class RankError(RuntimeError):
    """An error raised on rank 0 inside ``on_main``, re-raised on the other ranks (when it cannot be rebuilt)."""


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only (file writes, decisions read from files) and return its result on every rank.

    If ``fn`` raises, every rank raises the same error, so no rank waits for a rank that is gone. It is also a
    barrier: no rank leaves before rank 0 finished ``fn``.
    """
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: Exception | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            outcome, error = (False, err), err
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an error that cannot travel goes as its message
                outcome = (False, RankError(f"rank 0: {type(err).__name__}: {err}"))
    ok, value = broadcast(outcome)
    if ok:
        return value
    raise error if error is not None else value


def batch_share(index: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's block of a batch's row indices ``[B]`` and its weight ``len(block) / B``: the weighted block
    mean losses sum to the batch's mean loss. One process: ``(index, 1.0)``."""
    if not active():
        return index, 1.0
    share = index[shard(len(index))]
    return share, len(share) / max(len(index), 1)


def replicated(loss: torch.Tensor) -> torch.Tensor:
    """A loss term every rank computes identically (a regulariser of the parameters alone), scaled so that its
    gradient, summed over ranks by ``reduce_gradients``, counts once (exactly so for a power-of-two world)."""
    return loss / world_size() if active() else loss


def reduce_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum ``params``' gradients over ranks (one all-reduce) and return the summed ``loss`` (detached; a rank
    without rows passes ``None``, which counts as 0).

    A parameter without a gradient on some rank (its rows were not in that rank's block) counts as zero there; one
    without a gradient on every rank keeps ``grad = None`` (optimizers skip it, as in one process). One process:
    nothing changes and ``loss`` is returned as is.
    """
    if not active():
        return loss
    device = next((p.device for p in params), loss.device if loss is not None else torch.device("cpu"))
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    value = loss.detach().float().reshape(1) if loss is not None else torch.zeros(1, device=device)
    grads = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
             for p in params]
    flat = torch.cat([value, flags, *grads])
    dist.all_reduce(flat)
    # only a rank that lacked some gradient has to look at the flags (a host sync)
    reached = flat[1 : 1 + len(params)].tolist() if any(p.grad is None for p in params) else [1.0] * len(params)
    offset = 1 + len(params)
    for p, count in zip(params, reached):
        if count > 0:
            summed = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
        offset += p.numel()
    return flat[0]


def sum_over_ranks(values: Iterable[float], device: torch.device | str = "cpu") -> list[float]:
    """Elementwise sum of a few numbers over ranks (loss totals); the numbers themselves in one process."""
    values = list(values)
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's (after redundant work that may differ in the last bit on
    GPUs, e.g. activation ranges computed by every rank)."""
    if not active():
        return
    seen: set[int] = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        dist.broadcast(t.data, src=0)
