"""Running a CLI command on several processes: ``--nproc N`` starts it under ``torchrun`` (one process per GPU),
and ``rank_context`` sets up each rank that ``torchrun`` started (process group, its GPU, quiet ranks > 0).

``questdiff quantize --nproc 2 ...`` is ``torchrun --standalone --nproc-per-node 2 -m questdiff.cli quantize ...``;
``torchrun`` itself (several nodes, other rendezvous) works the same way without ``--nproc``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch

from . import distributed

# NVLink SHARP (NVLS) collectives fail on some multi-GPU hosts (e.g. the project's lent H200 machines): ranks that
# this launcher starts run with it off unless the user's environment says otherwise.
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0"}


def requested(args: argparse.Namespace) -> bool:
    """Whether ``args`` asks for several processes and this process is not already one of them."""
    nproc = getattr(args, "nproc", None)
    if nproc is None or distributed.launched():
        return False
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if _on_gpus(args) and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} GPU(s) here: "
                         "use at most one process per GPU")
    return nproc > 1


def _on_gpus(args: argparse.Namespace) -> bool:
    """Whether the command runs on GPUs (a GPU is present and ``--device`` does not say otherwise)."""
    return torch.cuda.is_available() and not str(getattr(args, "device", None) or "cuda").startswith("cpu")


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The ``torchrun`` command line that runs ``questdiff <argv>`` (less ``--nproc``, which torchrun's own parser
    would take for ``--nproc-per-node``) on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "questdiff.cli", *_without_nproc(argv)]


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepted, e.g. ``--np``)."""
    out: list[str] = []
    skip = False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 2 and "--nproc".startswith(name):
            skip = "=" not in token
        else:
            out.append(token)
    return out


def run_torchrun(argv: Sequence[str], nproc: int) -> int:
    """Run ``questdiff <argv>`` on ``nproc`` processes and return the exit status (non-zero if any rank failed:
    torchrun then stops the others and reports the failed rank, whose error is on stderr)."""
    env = {**NCCL_DEFAULTS, **os.environ}
    return subprocess.call(torchrun_command(argv, nproc), env=env)


def rank_prefix() -> str:
    """``" (rank r)"`` in a process torchrun started, else ``""`` (for error messages)."""
    return f" (rank {os.environ.get('RANK', '?')})" if distributed.launched() else ""


@contextlib.contextmanager
def rank_context(args: argparse.Namespace) -> Iterator[None]:
    """Around a command: under torchrun join the process group (each rank on its own GPU), keep logs and warnings
    to rank 0, and leave the group afterwards; outside torchrun nothing happens."""
    if not distributed.launched():
        yield
        return
    if not hasattr(args, "nproc"):
        raise ValueError(f"questdiff {args.command} runs in one process: start it without torchrun")
    device = getattr(args, "device", None)
    if device is not None and ":" in str(device):
        raise ValueError(f"--device {device} would put every rank on one GPU: pass --device cuda (each rank takes its "
                         "own GPU) or leave it out")
    distributed.init_from_env(cuda=_on_gpus(args))
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    try:
        yield
    finally:
        distributed.shutdown()
