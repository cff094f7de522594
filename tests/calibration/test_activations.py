import pytest
import torch

import questdiff as qd
from questdiff.prepare import act_quantizers
from questdiff.primitives import amin_amax, qparams_from_range

from builders import ddim_pipeline, tiny_unet2d


def test_every_row_initialised_per_timestep_and_resume(tmp_path):
    calib = qd.collect_calibration(ddim_pipeline(), num_samples=4, calib_steps=4, num_inference_steps=8,
                                   range_samples=0, progress=False)
    assert calib.range_steps is None
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


def _covered(q, row):
    from questdiff.calibration.activations import covered_range

    return covered_range(q, q.scale[row], q.zero_point[row])


@pytest.mark.parametrize("rule", ["at_or_before", "nearest"])
def test_rows_cover_the_range_steps_mapped_to_them(rule):
    """Each row's range is the union of its calibrated step's and those of the recorded steps that share the row."""
    pipe = ddim_pipeline()
    recorded = qd.collect_calibration(pipe, num_samples=4, num_inference_steps=8, progress=False)
    calib = recorded.select(calib_steps=3)
    assert len(calib.range_steps) == 5 * 4 and calib.recorded_timesteps == recorded.timesteps
    unet = qd.quantize(tiny_unet2d(), "W8A8", calib, progress=False, timestep_rule=rule)
    narrow = qd.quantize(tiny_unet2d(), "W8A8", recorded.select(calib_steps=3, keep_range_steps=False), progress=False,
                         timestep_rule=rule)
    schedule = qd.handle(unet).schedule
    assert schedule.recorded == tuple(recorded.timesteps)
    first, first_narrow = (act_quantizers(m)["conv_in.act_quantizer"] for m in (unet, narrow))
    widened = 0
    for k in range(len(schedule)):
        mapped = [t for t in recorded.timesteps if schedule.index(t) == k]  # its own step and the range steps
        x = recorded.xs[torch.isin(recorded.ts, torch.tensor(mapped))]
        (lo, hi), half_step = _covered(first, k), first.scale[k] / 2
        assert bool((lo <= x.min() + half_step).all() and (hi >= x.max() - half_step).all()), k
        lo_n, hi_n = _covered(first_narrow, k)
        assert bool((lo <= lo_n).all() and (hi >= hi_n).all())
        widened += bool((lo < lo_n).any() or (hi > hi_n).any())
    assert widened  # some range step's x_t reaches beyond its row's calibrated step


def test_one_unit_rows_are_exactly_the_init():
    """Without range steps the union bookkeeping leaves the init untouched; a range unit inside a row's range too."""
    from questdiff.calibration.activations import RowRanges
    from questdiff.config import ActivationSpec
    from questdiff.nn import ActQuantizer
    from questdiff.primitives import search_minmax
    from questdiff.timestep import TimestepSchedule, TimestepState

    q = ActQuantizer(1, ActivationSpec(bits=8), TimestepState(TimestepSchedule((1.0,))))
    ranges = RowRanges(0)
    wide = search_minmax(torch.linspace(-2, 3, 50), 8, False)
    ranges.set(q, *wide)
    ranges.finish_unit()
    assert torch.equal(q.scale[0], wide[0].reshape(-1)) and torch.equal(q.zero_point[0], wide[1].reshape(-1))
    ranges.set(q, *search_minmax(torch.linspace(-1, 1, 50), 8, False))  # inside: nothing widens
    assert torch.equal(q.scale[0], wide[0].reshape(-1)) and torch.equal(q.zero_point[0], wide[1].reshape(-1))
    ranges.set(q, *search_minmax(torch.linspace(-1, 6, 50), 8, False))
    lo, hi = _covered(q, 0)
    assert lo.item() == pytest.approx(-2, abs=0.03) and hi.item() == pytest.approx(6, abs=0.03)


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
