"""The rank helpers: the sharding rule, gradients summed over ranks (two forked gloo ranks against one process),
errors of rank 0's work raised on every rank, and a failing rank ending a torchrun launch instead of hanging it."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from torch import nn

from questdiff import distributed

SOURCE = Path(distributed.__file__)


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_cuts_contiguous_balanced_blocks_in_rank_order(n, world):
    blocks = [list(range(n))[distributed.shard(n, r, world)] for r in range(world)]
    assert [i for block in blocks for i in block] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_one_process_helpers_change_nothing():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    index = torch.arange(5)
    share, weight = distributed.batch_share(index)
    assert share is index and weight == 1.0
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    loss = torch.tensor(0.5)
    assert distributed.reduce_gradients([p], loss) is loss and torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.gather(7) == [7] and distributed.broadcast(7) == 7 and distributed.on_main(lambda: 7) == 7


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 4, generator=g), torch.randn(7, 1, generator=g)


def data_parallel_gradients(batch: list[int]) -> dict[str, object]:
    """The gradients and loss of the mean squared error over rows ``batch``, from this rank's block; one extra
    parameter no rank uses and one only the last rank uses."""
    model, (x, y) = _model(), _rows()
    unused, last_only = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    params = [*model.parameters(), unused, last_only]
    index, weight = distributed.batch_share(torch.tensor(batch))
    loss = None
    if len(index):
        loss = (model(x[index]) - y[index]).pow(2).mean() * weight
        if distributed.rank() == distributed.world_size() - 1:
            loss = loss + last_only.sum()
        loss.backward()
    total = distributed.reduce_gradients(params, loss)
    return {"loss": float(total), "grads": [None if p.grad is None else p.grad.clone() for p in params],
            "rows": len(index)}


@pytest.mark.parametrize("batch", [[0, 2, 3, 5, 6], [4]], ids=["rows 2+3", "rows 0+1"])
def test_two_ranks_sum_the_gradient_of_the_batch_mean_loss(batch):
    model, (x, y) = _model(), _rows()
    loss = (model(x[batch]) - y[batch]).pow(2).mean()
    loss.backward()
    ranks = run_ranks(data_parallel_gradients, batch)
    assert [r["rows"] for r in ranks] == [len(batch) // 2, len(batch) - len(batch) // 2]
    for result in ranks:
        *grads, unused, last_only = result["grads"]
        for got, p in zip(grads, model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)  # the same sum in another order
        assert unused is None  # no rank had a gradient: optimizers skip it, as in one process
        assert torch.equal(last_only, torch.ones(2))  # one rank's gradient reaches every rank
        assert result["loss"] == pytest.approx(loss.item() + 2.0, rel=1e-6)


def gathered_blocks(counts: list[int]) -> torch.Tensor:
    block = torch.full((counts[distributed.rank()], 2), float(distributed.rank()))
    return distributed.gather_blocks(block, counts)


@pytest.mark.parametrize("counts", [[2, 3], [0, 3]])
def test_gather_blocks_joins_uneven_blocks_in_rank_order(counts):
    expected = torch.cat([torch.full((n, 2), float(r)) for r, n in enumerate(counts)])
    assert all(torch.equal(result, expected) for result in run_ranks(gathered_blocks, counts))


def failing_main_work() -> str:
    def work() -> None:
        raise ValueError("the output folder is full")

    try:
        distributed.on_main(work)
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


def test_an_error_in_rank_0_work_is_raised_on_every_rank():
    assert run_ranks(failing_main_work) == ["ValueError: the output folder is full"] * 2


def test_a_failing_rank_ends_a_torchrun_launch_with_its_error(tmp_path):
    # rank 1 raises while rank 0 waits for it in a collective: torchrun must stop rank 0 and report rank 1's error
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("distributed", {str(SOURCE)!r})  # (torch only: fast start)
        distributed = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(distributed)
        distributed.init_from_env()
        if distributed.rank() == 1:
            raise ValueError("rank 1 ran out of memory")
        distributed.gather("rank 0 waits here")
        print("rank 0 went on")
    """))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and time.perf_counter() - start < 60
    assert "rank 1 ran out of memory" in run.stderr and "rank 0 went on" not in run.stdout
