import torch

import questdiff as qd
from questdiff.prepare import act_quantizers

from builders import ddim_pipeline, tiny_unet2d


def test_every_row_initialised_per_timestep_and_resume(tmp_path):
    calib = qd.collect_calibration(ddim_pipeline(), num_samples=4, calib_steps=4, num_inference_steps=8, progress=False)
    unet = qd.quantize(tiny_unet2d(), "W8A8", calib, progress=False, work_dir=tmp_path)
    quantizers = act_quantizers(unet)
    for name, q in quantizers.items():
        assert not torch.any(q.scale == 1.0), f"{name} has an uninitialised row"
    # time-step-aware: rows of the first conv differ across timesteps (activation ranges change with t)
    first = quantizers["conv_in.act_quantizer"]
    assert first.bits == 8 and len(set(first.scale.flatten().tolist())) > 1
    stages = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert stages == ["00-weight_init.json", "00-weight_init.safetensors", "01-act_init.json", "01-act_init.safetensors"]
    resumed = qd.quantize(tiny_unet2d(), "W8A8", calib, progress=False, work_dir=tmp_path)
    assert all(r.get("resumed") for r in qd.handle(resumed).extra["report"])
    for key, value in unet.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key])
