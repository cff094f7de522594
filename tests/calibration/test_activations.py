import torch

import questdiff as qd
from questdiff.prepare import act_quantizers
from questdiff.primitives import amin_amax, qparams_from_range

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
    # row k comes from the rows of timestep k: conv_in reads the raw x_t, and W8A8's running statistics over one
    # batch (4 rows per timestep) end at the min/max range of exactly that timestep's samples
    assert qd.presets.W8A8.running_stat
    for k, t in enumerate(calib.timesteps):
        x = calib.xs[calib.ts == t]
        lo, hi = amin_amax(x, first.reduce_axis(x))
        scale, zero_point = qparams_from_range(lo, hi, first.bits, first.symmetric, first.always_zero)
        assert torch.allclose(first.scale[k], scale.reshape(-1)), f"row {k} is not timestep {t:g}'s"
        assert torch.equal(first.zero_point[k], zero_point.reshape(-1).to(first.zero_point.dtype))
    stages = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert stages == ["00-weight_init.json", "00-weight_init.safetensors", "01-act_init.json", "01-act_init.safetensors"]
    resumed = qd.quantize(tiny_unet2d(), "W8A8", calib, progress=False, work_dir=tmp_path)
    assert all(r.get("resumed") for r in qd.handle(resumed).extra["report"])
    for key, value in unet.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key])
