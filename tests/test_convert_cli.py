"""``questdiff convert`` from the shell side (in process): quantize -> convert -> sample the deployed folder."""
from __future__ import annotations

import json

from builders import ddim_pipeline
from questdiff.cli import main


def test_quantize_convert_sample(tmp_path, capsys):
    folder = tmp_path / "pipe"
    ddim_pipeline().save_pretrained(folder)
    q = tmp_path / "w8a8"
    assert main(["quantize", "--model", str(folder), "--calib-samples", "2", "--calib-steps", "3", "--steps", "6",
                 "--device", "cpu", "--out", str(q)]) == 0
    assert "questdiff convert" in capsys.readouterr().out  # quantize names the convert command to run next
    assert main(["convert", "--model", str(folder), "--quantized", str(q), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    deployed = q / "deployed"
    assert "questdiff convert: done" in out and "on kernels" in out and str(deployed) in out
    meta = json.loads((deployed / "questdiff-deployed.json").read_text())
    assert meta["quant_config"]["name"] == "W8A8" and meta["layers"]
    assert (deployed / "deployed.safetensors").stat().st_size < (q / "model.safetensors").stat().st_size / 2
    for source, name in ((q, "fake"), (deployed, "deployed")):
        assert main(["sample", "--model", str(folder), "--quantized", str(source), "--num-images", "2", "--steps", "6",
                     "--device", "cpu", "--seed", "3", "--out", str(tmp_path / name)]) == 0
    assert "W8A8 deployed" in capsys.readouterr().out
    from PIL import Image
    import numpy as np

    fake, dep = (np.asarray(Image.open(tmp_path / n / "images" / "00000.png"), dtype=np.float64) / 255
                 for n in ("fake", "deployed"))
    assert 10 * np.log10(1 / max(((fake - dep) ** 2).mean(), 1e-12)) > 30  # same seeds: the same picture


def test_convert_refuses_a_deployed_folder_and_a_wrong_folder(tmp_path, capsys):
    assert main(["convert", "--quantized", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "not a questdiff checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
