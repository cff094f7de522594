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


def test_rotated_layers_initialise_from_the_rotated_input(calib):
    """Activation init sees what the quantizer quantizes: the rotated input, not the layer's argument."""
    from builders import ROTATED_W4A4

    from questdiff.calibration.activations import init_activations
    from questdiff.config import ActivationSpec
    from questdiff.prepare import handle, prepare, quant_layers
    from questdiff.primitives import search_minmax

    config = ROTATED_W4A4.replace(activation=ActivationSpec(bits=4, rotation=8, scale_method="minmax"))
    unet = prepare(tiny_unet2d(), config, qd.TimestepSchedule.from_timesteps(calib.timesteps))
    name, layer = next((n, m) for n, m in quant_layers(unet).items() if m.rotation is not None and not m.split)
    state, seen = handle(unet).state, {}
    hook = layer.register_forward_pre_hook(lambda m, args: seen.setdefault(state.require_index(), args[0].detach()))
    init_activations(unet, calib, progress=False)
    hook.remove()
    assert len(seen) == len(calib.timesteps) > 1
    for row, x in seen.items():
        rotated_scale, _ = search_minmax(layer.rotation(x).float(), 4, False)
        plain_scale, _ = search_minmax(x.float(), 4, False)
        torch.testing.assert_close(layer.act_quantizer.scale[row], rotated_scale.reshape(-1), msg=name)
        assert not torch.allclose(rotated_scale, plain_scale)
