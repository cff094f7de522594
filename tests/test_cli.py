"""``questdiff quantize`` then ``questdiff sample`` from the shell on a tiny pipeline folder."""
import json
import subprocess
import sys

import pytest
import torch

from builders import ddim_pipeline


def _run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "questdiff.cli", *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"questdiff {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    ddim_pipeline().save_pretrained(folder)
    return folder


def test_quantize_then_sample(pipeline_folder, tmp_path, capsys):
    """In process, for speed (``test_bad_arguments_give_one_line_errors`` runs the real entry point)."""
    from questdiff.cli import main

    out = tmp_path / "w4a8"
    command = ["quantize", "--model", str(pipeline_folder), "--preset", "W4A8", "--calib-samples", "4",
               "--calib-steps", "3", "--steps", "6", "--device", "cpu", "--out", str(out)]
    assert main(command) == 0
    stdout = capsys.readouterr().out
    assert "questdiff quantize: done" in stdout and "W4A8" in stdout
    assert {"model.safetensors", "questdiff.json", "calibration.safetensors", "summary.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibrated timesteps"] == 3
    # rerunning the same command reloads the finished run: the calibration data and every stage come from OUT
    assert main(command) == 0
    assert "weight_init resumed, act_init resumed" in capsys.readouterr().out
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(pipeline_folder), "--quantized", str(out), "--num-images", "3",
                 "--steps", "6", "--scheduler", "ddim", "--device", "cpu", "--out", str(samples)]) == 0
    assert "questdiff sample: done" in capsys.readouterr().out
    assert (samples / "grid.png").is_file() and len(list((samples / "images").glob("*.png"))) == 3
    # timesteps the calibration never visited (another step count): one warning before sampling, naming the fix
    with pytest.warns(UserWarning, match="never visited.*quantize --scheduler") as caught:
        assert main(["sample", "--model", str(pipeline_folder), "--quantized", str(out), "--num-images", "1",
                     "--steps", "5", "--scheduler", "ddim", "--device", "cpu", "--out", str(samples)]) == 0
    assert sum("never visited" in str(w.message) for w in caught) == 1


def test_quantize_a_dit_pipeline_folder(tmp_path, capsys):
    """A diffusers DiTPipeline folder through the CLI (in process, for speed): QuEST with tiny stage settings,
    resume, then sampling with DPM++."""
    from builders_transformers import tiny_dit_pipeline
    from questdiff.cli import main

    folder = tmp_path / "dit"
    tiny_dit_pipeline().save_pretrained(folder)
    out = tmp_path / "q"
    args = ["quantize", "--model", str(folder), "--preset", "W4A8", "--method", "quest", "--calib-samples", "2",
            "--calib-steps", "2", "--steps", "4", "--recon-iters", "2", "--tla-epochs", "1", "--cma-epochs", "1",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibrated timesteps"] == 2 and summary["method"] == "quest"
    meta = json.loads((out / "questdiff.json").read_text())
    assert meta["base_class"] == "DiTTransformer2DModel" and meta["adapter"]["name"] == "diffusers-transformer"
    capsys.readouterr()
    assert main(args) == 0  # the reloaded calibration set (class-conditional inputs) resumes every stage
    assert capsys.readouterr().out.count("resumed") == 5
    assert main(["sample", "--model", str(folder), "--quantized", str(out), "--num-images", "2", "--steps", "3",
                 "--scheduler", "dpm++", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert "questdiff sample: done" in capsys.readouterr().out and (tmp_path / "s" / "grid.png").is_file()


def test_bad_arguments_give_one_line_errors(tmp_path):
    """The installed entry point in its own process: exit code 2 and one line on stderr (tests/test_cli_inputs.py
    checks every input in process)."""
    result = _run("quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "neither a pipeline folder nor a zoo diffusion model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_order_flag_reaches_both_finetuning_stages():
    from questdiff.calibration.quest import resolve_options
    from questdiff.cli import _method_options, build_parser

    parser = build_parser()
    args = parser.parse_args(["quantize", "--method", "quest", "--order", "mixed", "--tla-epochs", "3"])
    options = _method_options(args)
    assert options == {"tla": {"epochs": 3, "order": "mixed"}, "cma": {"order": "mixed"}}
    resolved = resolve_options(options, "quest")
    assert resolved.tla.order == resolved.cma.order == "mixed" and resolved.tla.epochs == 3
    assert _method_options(parser.parse_args(["quantize", "--method", "quest-tla", "--order", "mixed"])) == {"tla": {"order": "mixed"}}
    with pytest.raises(ValueError, match="--order does not apply to method 'rtn'"):
        _method_options(parser.parse_args(["quantize", "--method", "rtn", "--order", "mixed"]))


def _tensors(path):
    """(tensors, metadata) of a safetensors file (its header's key order varies from process to process)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def test_quantize_on_two_processes_writes_the_one_process_result(pipeline_folder, tmp_path, capsys):
    """``--nproc 2`` starts torchrun (gloo on CPU): each rank samples one of the two calibration batches and rank 0
    writes the files and the summary (resuming on several ranks: tests/calibration/test_methods.py). RTN is
    deterministic, so the files hold the one-process tensors bit for bit."""
    from questdiff.cli import main

    common = ["quantize", "--model", str(pipeline_folder), "--preset", "W4A8", "--calib-samples", "4", "--batch-size",
              "2", "--calib-steps", "3", "--steps", "6", "--device", "cpu", "--keep-stages"]
    two = _run(*common, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert two.stdout.count("questdiff quantize: done") == 1  # rank 0 alone reports
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    for name in ("calibration.safetensors", "model.safetensors", "work/stages/01-act_init.safetensors"):
        two_file, one_file = _tensors(tmp_path / "two" / name), _tensors(tmp_path / "one" / name)
        assert two_file[1] == one_file[1] and two_file[0].keys() == one_file[0].keys(), name
        assert all(torch.equal(v, one_file[0][k]) for k, v in two_file[0].items()), name
