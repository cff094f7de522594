"""The scaling benchmark's CPU smoke mode: one process in-process, then two gloo ranks under torchrun, merged into
one table with the speedup column."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports quest_cost / architectures as top-level modules


def test_scaling_quick_on_one_and_two_processes(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_scaling", BENCHMARKS / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    argv = ["--quick", "--models", "ldm4", "--out", str(tmp_path)]
    assert scaling.main(argv) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(scaling.distributed.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(BENCHMARKS / "scaling.py"), *argv], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = json.loads((tmp_path / "scaling-quick.json").read_text())["runs"]
    assert [(r["model"], r["world"]) for r in runs] == [("ldm4", 1), ("ldm4", 2)]
    for report in runs:
        assert all(report["stages"][stage]["throughput"] > 0 for stage in scaling.THROUGHPUT_STAGES)
        assert report["projection"]["hours"]["total"] > 0
    table = (tmp_path / "scaling-quick.md").read_text()
    assert "| 1 proc | 2 proc | speedup 2 |" in table and "| brecq_iterations | iterations/s (all units) |" in table
