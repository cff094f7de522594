"""Run a job on several gloo ranks (forked processes in one process group, as torchrun would start them) to compare
with one process. Each rank's return value comes back through a file, in rank order."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(job: Callable[..., Any], *args: Any, world: int = 2, **kwargs: Any) -> list[Any]:
    """``job(*args, **kwargs)`` on ``world`` ranks of one gloo process group; the ranks' results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        # forked, not spawned: the ranks start in a second instead of importing torch and questdiff again
        mp.start_processes(_rank_main, args=(world, tmp, job, args, kwargs), nprocs=world, join=True,
                           start_method="fork")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank_main(rank: int, world: int, tmp: str, job: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.save(job(*args, **kwargs), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
