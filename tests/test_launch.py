"""``--nproc``: the torchrun command it runs (``--nproc`` itself removed, NVLink SHARP off unless the user says
otherwise) and the checks a rank makes before joining the process group."""
from __future__ import annotations

import argparse
import sys

import pytest

from questdiff import launch


@pytest.mark.parametrize("given", [["--nproc", "2"], ["--nproc=2"], ["--np", "2"]])
def test_torchrun_runs_the_command_without_nproc(given):
    argv = ["quantize", "--model", "m", *given, "--out", "o"]
    assert launch.torchrun_command(argv, 2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "questdiff.cli",
        "quantize", "--model", "m", "--out", "o"]


def test_nvlink_sharp_is_off_unless_the_user_set_it(monkeypatch):
    seen = []
    monkeypatch.setattr(launch.subprocess, "call", lambda command, env: seen.append(env) or 0)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    assert launch.run_torchrun(["quantize"], 2) == 0
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    launch.run_torchrun(["quantize"], 2)
    assert [env["NCCL_NVLS_ENABLE"] for env in seen] == ["0", "1"]


def test_nproc_is_checked_and_ignored_under_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launch.requested(argparse.Namespace(nproc=None)) and not launch.requested(argparse.Namespace(nproc=1))
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        launch.requested(argparse.Namespace(nproc=0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.requested(argparse.Namespace(nproc=2))  # torchrun already started the ranks


def test_a_rank_refuses_a_shared_gpu_and_commands_that_run_in_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every rank on one GPU"):
        with launch.rank_context(argparse.Namespace(command="quantize", nproc=None, device="cuda:0")):
            pass
    with pytest.raises(ValueError, match="questdiff sample runs in one process"):
        with launch.rank_context(argparse.Namespace(command="sample", device=None)):
            pass
