"""Smoke runs of the QuEST benchmark scripts with their tiniest settings (CPU, in-process)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from builders import ddim_pipeline

from questdiff import zoo

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helpers (architectures.py) as top-level modules


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quest_cost_quick(tmp_path):
    assert _script("quest_cost").main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    reports = json.loads((tmp_path / "quest_cost-quick.json").read_text())
    assert [r["architecture"] for r in reports] == ["ldm4", "sd15"]
    for report in reports:
        assert set(report["stages"]) == {"weight_init", "brecq", "act_init", "tla", "cma"}
        assert report["projected_total_hours"] > 0
    assert "**total**" in (tmp_path / "quest_cost-quick.md").read_text()


def test_quest_cost_records_a_batch_that_does_not_fit(tmp_path, monkeypatch):
    script = _script("quest_cost")
    real = script.finetune

    def finetune(model, calib, objective, plan, **kwargs):
        if len(plan[0].index) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(model, calib, objective, plan, **kwargs)

    monkeypatch.setattr(script, "finetune", finetune)
    argv = ["--quick", "--quiet", "--arch", "ldm4", "--rows-per-t", "4", "--large-batch", "4", "--out", str(tmp_path)]
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "quest_cost-quick.json").read_text())[0]
    tla, cma = report["stages"]["tla"], report["stages"]["cma"]
    assert tla["large_batch"] == {"batch": 4, "error": "out of memory"} and tla["projected_hours"] > 0  # batch 2 fits
    assert cma["code_batch"] == {"batch": 4, "error": "out of memory"} and cma["projected_hours"] is None
    assert report["stages"]["brecq"]["projected_hours"] > 0  # the stages before stand
    assert report["projected_total_hours"] is None and report["projected_total_hours_large_batch"] is None
    assert "| OOM |" in (tmp_path / "quest_cost-quick.md").read_text()


def test_quest_tables_quick(tmp_path):
    ddim_pipeline().save_pretrained(tmp_path / "pipe")
    argv = ["--quick", "--quiet", "--model", str(tmp_path / "pipe"), "--presets", "W4A8", "--methods", "FP", "rtn",
            "quest", "quest-no-global", "--num-samples", "4", "--out", str(tmp_path / "out")]
    assert _script("quest_tables").main(argv) == 0
    result = json.loads((tmp_path / "out" / "quest_tables-quick.json").read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["FP", "rtn", "quest", "quest-no-global"]
    quest_row = result["rows"][2]
    assert quest_row["metrics"]["PSNR (dB)"] > 0 and [s["stage"] for s in quest_row["stages"]][-1] == "cma"
    assert all("seconds" in s for s in quest_row["stages"])  # it ran the shared stages: their cost is its cost
    no_global = result["rows"][3]["stages"]
    assert [s.get("resumed", False) for s in no_global] == [True, True, True, False, False]  # shared stages reused


def test_quest_tables_rotate_passes_the_rotation_through(tmp_path):
    ddim_pipeline().save_pretrained(tmp_path / "pipe")
    argv = ["--quick", "--quiet", "--model", str(tmp_path / "pipe"), "--presets", "W4A4", "--methods", "rtn",
            "--rotate", "8", "--num-samples", "2", "--out", str(tmp_path / "out")]
    assert _script("quest_tables").main(argv) == 0
    result = json.loads((tmp_path / "out" / "quest_tables-quick.json").read_text())
    assert [row["preset"] for row in result["rows"]] == ["W4A4-rot8"] and result["settings"]["rotate"] == 8
    with pytest.raises(SystemExit):
        _script("quest_tables").main([*argv[:-4], "--rotate", "12"])
    tensor = [a for a in argv if a not in ("--rotate", "8")] + ["--act-granularity", "tensor"]
    assert _script("quest_tables").main(tensor) == 0
    result = json.loads((tmp_path / "out" / "quest_tables-quick.json").read_text())
    assert [row["preset"] for row in result["rows"]] == ["W4A4-tensor"]


def test_quest_tables_quick_on_a_dit_with_cma_layers_by_sensitivity(tmp_path):
    from builders_transformers import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    argv = ["--quick", "--quiet", "--model", str(tmp_path / "dit"), "--presets", "W4A8", "--methods", "FP", "quest",
            "--cma-critical", "sensitivity", "--cma-top-k", "3", "--num-samples", "2", "--out", str(tmp_path / "out")]
    assert _script("quest_tables").main(argv) == 0
    result = json.loads((tmp_path / "out" / "quest_tables-quick.json").read_text())
    assert [row["method"] for row in result["rows"]] == ["FP", "quest"] and result["settings"]["cma_critical"] == "sensitivity"
    quest = result["rows"][1]
    assert [s["stage"] for s in quest["stages"]] == ["weight_init", "brecq", "act_init", "tla", "cma"]
    assert quest["metrics"]["PSNR (dB)"] > 0
    stage = next((tmp_path / "out" / "quest_tables_work-quick" / "dit" / "W4A8" / "per-t" / "quest-cma-sensitivity3" /
                  "stages").glob("*-cma.json"))
    cma = json.loads(stage.read_text())["signature"]["stages"]["cma"]
    assert cma["critical"] == "sensitivity" and cma["top_k"] == 3


@pytest.mark.skipif(not zoo.has_default(), reason="the zoo does not ship the default model's weights")
def test_deploy_latency_zoo_comparison_runs_on_the_cpu(tmp_path):
    """The deployed-vs-fake-quant PSNR and its float-noise floor on the shipped default model (reference kernels)."""
    out = tmp_path / "deploy.json"
    argv = ["--no-sd15", "--zoo", zoo.DEFAULT_MODEL, "--device", "cpu", "--zoo-images", "2", "--zoo-batch", "2",
            "--zoo-calib-samples", "1", "--zoo-steps", "4", "--out", str(out)]
    assert _script("deploy_latency").main(argv) == 0
    report = json.loads(out.read_text())["zoo"]
    assert report["FP_images_per_s"] > 0 and report["deployed_images_per_s"] > 0
    # the FP model is smooth: float-noise-sized output changes stay float-noise sized after sampling
    assert report["psnr_fp_vs_itself_perturbed_db"] > 80
    assert report["psnr_deployed_vs_fake_quant_db"] > 20


def test_dit_latency_tiny_runs_every_architecture_deployed(tmp_path):
    """The DiT latency benchmark's plumbing (build, deploy, inputs, timing) on tiny configs: every architecture's
    bf16 and deployed W8A8 rows are measured, none fails."""
    out = tmp_path / "dit.json"
    assert _script("dit_latency").main(["--tiny", "--modes", "eager", "--reps", "1", "--batches", "2",
                                        "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("flux", "dit", "pixart"):
        rows = report[name]
        assert {r["model"] for r in rows} == {"bf16", "W8A8"} and all("error" not in r and r["ms"] > 0 for r in rows)


def test_between_steps_quick(tmp_path):
    assert _script("between_steps").main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "between_steps-tutorial-quick.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["before", "widen"] and all(r["sampler"] == "ddim" for r in rows)
    assert "| tutorial-unet |" in (tmp_path / "between_steps-tutorial-quick.md").read_text()
