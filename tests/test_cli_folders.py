"""Issue 20 through the command line (in process): a folder holds one kind of checkpoint and one run's results,
``convert`` prints a command that pastes, its counts agree, a checkpoint meets the model it was made from, and the
full DDPM chain samples."""
from __future__ import annotations

import json
import logging
import shlex

import pytest
from diffusers import DDIMScheduler

from builders import tiny_unet2d
from questdiff import zoo
from questdiff.cli import main
from questdiff.zoo.pipelines import PixelDiffusionPipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny zoo-style pixel pipeline (it runs any scheduler) with the zoo models' ``steps_offset=1``."""
    path = tmp_path_factory.mktemp("pipe")
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    PixelDiffusionPipeline(unet=tiny_unet2d(), scheduler=scheduler, default_num_inference_steps=6).save_pretrained(path)
    return path


def _quantize(folder, out, preset="W8A8") -> None:
    assert main(["quantize", "--model", str(folder), "--preset", preset, "--calib-samples", "2", "--calib-steps", "3",
                 "--steps", "6", "--device", "cpu", "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "w8a8"
    _quantize(folder, out)
    return out


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("questdiff ")]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_gives_the_deployed_checkpoint_a_folder_of_its_own(folder, quantized, tmp_path, capsys):
    """Item 3: ``convert --out QUANTIZED`` and ``convert`` over another model's deployed checkpoint are refused
    (nothing changes there); converting the same model again replaces its deployed checkpoint; ``quantize`` into a
    deployed folder is refused."""
    before = _snapshot(quantized)
    assert main(["convert", "--model", str(folder), "--quantized", str(quantized), "--out", str(quantized)]) == 2
    assert _error(capsys) == (f"questdiff convert: error: --out {quantized}: holds a fake-quant checkpoint (questdiff.json, "
                              "written by questdiff.save / questdiff quantize); a folder holds one kind of checkpoint: "
                              "choose another --out")
    assert _snapshot(quantized) == before

    deployed = tmp_path / "deployed"
    for _ in range(2):  # the second conversion of the same model replaces the first
        assert main(["convert", "--model", str(folder), "--quantized", str(quantized), "--out", str(deployed)]) == 0
    capsys.readouterr()
    other = tmp_path / "w4a8"
    _quantize(folder, other, "W4A8")
    kept = _snapshot(deployed)
    assert main(["convert", "--model", str(folder), "--quantized", str(other), "--out", str(deployed)]) == 2
    assert _error(capsys).startswith(f"questdiff convert: error: --out {deployed}: holds the deployed checkpoint of "
                                     "another model (W8A8 rtn of base ")
    assert _snapshot(deployed) == kept

    assert main(["quantize", "--model", str(folder), "--calib-samples", "2", "--out", str(deployed)]) == 2
    assert _error(capsys).startswith(f"questdiff quantize: error: --out {deployed}: holds a deployed checkpoint")
    assert _snapshot(deployed) == kept


def test_convert_prints_a_next_command_that_pastes_and_one_count(folder, quantized, tmp_path, capsys, caplog):
    """Item 7: the printed ``sample`` command is shell-quoted (a path with spaces works when pasted), and the log
    and the summary table state the same deployed-layer count."""
    out = tmp_path / "my runs" / "w8a8 deployed"
    with caplog.at_level(logging.INFO, logger="questdiff.deploy.convert"):
        assert main(["convert", "--model", str(folder), "--quantized", str(quantized), "--device", "cpu",
                     "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    row = next(line for line in stdout.splitlines() if line.strip().startswith("deployed layers"))
    logged = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("converted UNet2DModel: "))
    assert logged.split(": ", 1)[1] == row.split("deployed layers", 1)[1].strip()
    meta = json.loads((out / "questdiff-deployed.json").read_text())
    assert row.split()[2:6] == [str(len(meta["layers"])), "layers", "+", str(len(meta["attention"]))]
    command = shlex.split(stdout.split("next:\n", 1)[1].strip())
    assert command == ["questdiff", "sample", "--model", str(folder), "--quantized", str(out), "--device", "cpu",
                       "--out", str(out / "samples")]
    assert main([*command[1:], "--num-images", "1", "--steps", "2"]) == 0
    assert (out / "samples" / "grid.png").is_file()


def test_sample_replaces_the_images_of_an_earlier_run(folder, tmp_path, capsys):
    """Item 3: a second ``sample`` into the same ``--out`` leaves exactly its own images, and says it replaced some."""
    out = tmp_path / "samples"
    for count in (3, 2):
        assert main(["sample", "--model", str(folder), "--num-images", str(count), "--steps", "2", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert "(replacing the 3 of an earlier run)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images"]


@pytest.mark.skipif(not zoo.has_default(), reason="the default zoo model is not shipped")
@pytest.mark.parametrize("deployed", [False, True])
def test_a_checkpoint_meets_only_the_model_it_was_made_from(deployed, folder, quantized, tmp_path, capsys):
    """Item 6: a (deployed) checkpoint with a missing ``--model`` (the default zoo model is another model) is one line
    naming ``--model``, before any sampling, not a traceback from inside the pipeline."""
    path = quantized
    if deployed:
        path = tmp_path / "deployed"
        assert main(["convert", "--model", str(folder), "--quantized", str(quantized), "--out", str(path)]) == 0
        capsys.readouterr()
    assert main(["sample", "--quantized", str(path), "--num-images", "1", "--out", str(tmp_path / "s")]) == 2
    line = _error(capsys)
    assert line.startswith(f"questdiff sample: error: --model: {path} was quantized from another model (base fingerprint ")
    assert line.endswith("pass the --model it was quantized from (questdiff quantize's --model; default: the embedded "
                         "zoo model)")
    assert not (tmp_path / "s").exists()


def test_ddpm_samples_the_full_chain(folder, tmp_path, capsys):
    """Item 6: ``--scheduler ddpm --steps 1000`` with ``steps_offset=1`` ran timestep 1000 (an IndexError, for the FP
    model too); the full chain now runs 999..0 (every scheduler: tests/test_pipelines.py)."""
    assert main(["sample", "--model", str(folder), "--scheduler", "ddpm", "--steps", "1000", "--num-images", "1",
                 "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert "DDPMScheduler" in capsys.readouterr().out and (tmp_path / "s" / "images" / "00000.png").is_file()
