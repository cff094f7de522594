"""Resumable stages end to end: a ``questdiff quantize`` killed mid-stage resumes to the uninterrupted result, and
rerunning a finished run resumes every stage (on a class-conditional model, whose calibration set has a conditioning
input that a reload returns in another key order), and on two ranks."""
import os
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from questdiff import cli
from questdiff.zoo.pipelines import ClassConditionalLDMPipeline, ClassEmbedder

import rank_jobs
from builders import tiny_vae
from ranks import run_ranks


@pytest.fixture(scope="module")
def class_conditional_folder(tmp_path_factory):
    """The smallest class-conditional LDM pipeline folder (one cross-attention level, 4x4 latents)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    pipe = ClassConditionalLDMPipeline(tiny_vae(), unet, ClassEmbedder(10, 8), DDIMScheduler(clip_sample=False))
    folder = tmp_path_factory.mktemp("class-ldm")
    pipe.save_pretrained(folder)
    return folder


def _arguments(folder, out) -> list[str]:
    return ["quantize", "--model", str(folder), "--preset", "W4A8", "--method", "qdiffusion", "--recon-iters", "5",
            "--calib-samples", "2", "--calib-steps", "3", "--steps", "4", "--device", "cpu", "--out", str(out)]


def _quantize(folder, out, capsys) -> str:
    assert cli.main(_arguments(folder, out)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_killed_run_resumes_to_the_uninterrupted_result(class_conditional_folder, tmp_path, capsys):
    reference = tmp_path / "uninterrupted"
    _quantize(class_conditional_folder, reference, capsys)

    killed = tmp_path / "killed"
    stages = killed / "work" / "stages"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "questdiff.cli", *_arguments(class_conditional_folder, killed)],
                                   stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while not (stages / "00-weight_init.json").is_file():  # the first stage is finished: kill the second
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the first stage did not finish in 300 s"
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert not (stages / "01-brecq.json").exists() and not (killed / "model.safetensors").exists()  # killed mid-run

    resumed = _quantize(class_conditional_folder, killed, capsys)
    assert "weight_init resumed" in resumed and "brecq resumed" not in resumed
    expected, got = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    again = _quantize(class_conditional_folder, killed, capsys)  # rerunning a finished run resumes every stage
    assert all(f"{stage} resumed" in again for stage in ("weight_init", "brecq", "act_init"))


def test_two_ranks_resume_the_stages_rank_0_wrote(calib, tmp_path):
    ranks = run_ranks(rank_jobs.quantize_twice, calib, str(tmp_path / "work"))
    assert ranks[0]["written"] == ["00-weight_init.safetensors", "01-act_init.safetensors"] and ranks[1]["written"] == []
    for result in ranks:
        first, second = result["reports"]
        assert [r.get("resumed", False) for r in first] == [False, False]
        assert [r.get("resumed", False) for r in second] == [True, True]  # both ranks read rank 0's files
        assert all(torch.equal(v, ranks[0]["state"][k]) for k, v in result["state"].items())


def test_ctrl_c_inside_brecq_keeps_the_finished_units_and_resumes_to_the_uninterrupted_result(
        class_conditional_folder, tmp_path, capsys, monkeypatch):
    """Issue 20 item 5: Ctrl-C in the middle of BRECQ keeps every unit finished so far; the rerun reconstructs only
    the others and ends bit-exactly where an uninterrupted run does."""
    from questdiff.calibration import brecq

    reconstruct_unit, calls, interrupt_at = brecq.reconstruct_unit, [], [None]

    def counted(unit, *args, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # Ctrl-C while this unit trains
        return reconstruct_unit(unit, *args, **kwargs)

    monkeypatch.setattr(brecq, "reconstruct_unit", counted)
    reference = tmp_path / "uninterrupted"
    _quantize(class_conditional_folder, reference, capsys)
    units, interrupt_at[0] = list(calls), 4
    calls.clear()
    killed = tmp_path / "killed"
    assert cli.main(_arguments(class_conditional_folder, killed)) == 130
    assert "1 finished stage(s) (weight_init) and 3 finished part(s) of brecq" in capsys.readouterr().err

    calls.clear()
    interrupt_at[0] = None
    resumed = _quantize(class_conditional_folder, killed, capsys)
    assert "weight_init resumed" in resumed and "brecq resumed" not in resumed
    assert len(units) > 4 and calls == units[3:]  # the three finished units are restored, not reconstructed
    expected, got = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [p.name for p in (killed / "work" / "stages").iterdir()] == ["finished.json"]  # parts and stages removed


def test_stage_files_are_removed_once_the_model_is_saved_unless_kept(class_conditional_folder, tmp_path, capsys):
    """Issue 20 item 7: the model-sized stage files are replaced by one small record once the final model is saved
    (``--keep-stages`` keeps them); a rerun with the same settings loads the saved model, one with other settings
    is refused."""
    removed, kept = tmp_path / "removed", tmp_path / "kept"
    _quantize(class_conditional_folder, removed, capsys)
    assert cli.main([*_arguments(class_conditional_folder, kept), "--keep-stages"]) == 0
    capsys.readouterr()
    assert [p.name for p in (removed / "work" / "stages").iterdir()] == ["finished.json"]
    assert {"00-weight_init.safetensors", "01-brecq.safetensors", "02-act_init.safetensors"} <= {
        p.name for p in (kept / "work" / "stages").iterdir()}
    size = sum(p.stat().st_size for p in removed.rglob("*") if p.is_file())
    model = (removed / "model.safetensors").stat().st_size + (removed / "calibration.safetensors").stat().st_size
    assert size < model + 20_000, (size, model)  # the model, its calibration data and small json files
    assert load_file(removed / "model.safetensors").keys() == load_file(kept / "model.safetensors").keys()

    before = (removed / "model.safetensors").read_bytes()
    again = _quantize(class_conditional_folder, removed, capsys)
    assert all(f"{stage} resumed" in again for stage in ("weight_init", "brecq", "act_init"))
    assert (removed / "model.safetensors").read_bytes() == before
    other = [*_arguments(class_conditional_folder, removed)]
    other[other.index("--recon-iters") + 1] = "6"
    assert cli.main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "finished.json records a finished run with other settings" in err and "brecq.iters: saved 5, now 6" in err
