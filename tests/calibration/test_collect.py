"""Calibration collection on two gloo ranks equals one process: same rows in the same order, same digest."""
from __future__ import annotations

import rank_jobs
import torch
from ranks import run_ranks


def test_two_ranks_collect_the_one_process_calibration_set():
    # 5 samples in batches of 2: rank 0 samples batch [0, 1], rank 1 batches [2, 3] and [4] (uneven blocks)
    settings = {"num_samples": 5, "batch_size": 2, "num_inference_steps": 6, "calib_steps": 3, "samples_per_step": 4}
    alone = rank_jobs.collect(**settings)
    ranks = run_ranks(rank_jobs.collect, **settings)
    assert [r["rows_run"] for r in ranks] == [2 * 6, 3 * 6] and alone["rows_run"] == 5 * 6  # the work was split
    for result in ranks:
        assert result["digest"] == alone["digest"] and result["shape"] == alone["shape"]
        assert torch.equal(result["steps"], alone["steps"])
        assert result["inputs"].keys() == alone["inputs"].keys()
        assert all(torch.equal(result["inputs"][k], v) for k, v in alone["inputs"].items())
