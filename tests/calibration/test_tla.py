"""TLA: trains only the time-embedding layers and their scale rows, lowers its loss, keeps an FP teacher."""
from __future__ import annotations

import pytest
import torch
from quest_helpers import outputs_per_timestep

import questdiff as qd
from questdiff.calibration import BrecqConfig, TLAConfig, run_tla
from questdiff.calibration.tla import tla_objective
from questdiff.prepare import handle, quant_state


def _calibrated(unet, calib, name="W4A4"):
    # QuEST's attention format (4-bit q/k/v, quantized probabilities): it leaves TLA a loss well above this tiny
    # model's batch-to-batch noise; with the "qk" default the loss before TLA is already within that noise
    config = qd.presets.get(name).replace(attention="qkvp")
    return qd.quantize(unet, config, calib, "qdiffusion", progress=False, brecq=BrecqConfig(iters=2, batch_size=4))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("order", ["shuffled", "mixed"])
def test_tla_touches_only_time_embedding_layers_and_trained_rows(unet, calib, order):
    _calibrated(unet, calib)
    with quant_state(unet, weight=False, act=False):
        fp_before = outputs_per_timestep(unet, calib)
    before = _snapshot(unet)
    trained_t = (900.0, 300.0)
    config = TLAConfig(epochs=2, weight_lr=1e-3, act_lr=1e-3, timesteps=trained_t, order=order)
    run_tla(unet, calib, config, progress=False)
    after = _snapshot(unet)
    tla_layers = [n for n, info in handle(unet).layers.items() if "time_proj" in info.roles]
    assert len(tla_layers) == 8
    owned = {f"{n}.{p}" for n in tla_layers for p in ("weight", "bias")}
    scales = {f"{n}.act_quantizer.scale" for n in tla_layers}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= owned | scales
    assert owned <= changed and scales & changed
    rows = [handle(unet).schedule.index(t) for t in trained_t]
    frozen = [r for r in range(4) if r not in rows]
    for key in scales:
        assert torch.equal(before[key][frozen], after[key][frozen]), key
    with quant_state(unet, weight=False, act=False):  # the teacher still runs the original weights
        assert torch.equal(outputs_per_timestep(unet, calib), fp_before)


@pytest.mark.parametrize(("order", "epochs"), [("shuffled", 8), ("mixed", 32)])
def test_tla_lowers_its_loss(unet, calib, order, epochs):
    """Same step count: a shuffled epoch is one step per timestep (4), a mixed epoch one step of all timesteps."""
    _calibrated(unet, calib)
    config = TLAConfig(epochs=epochs, weight_lr=1e-3, act_lr=1e-3, batch_size=8, order=order)
    result = run_tla(unet, calib, config, progress=False)
    print(f"TLA loss (tiny UNet W4A4, {epochs} epochs, {order}): {result.loss_before:.5f} -> {result.loss_after:.5f}")
    assert result.loss_after < result.loss_before
    assert len(result.losses) == 32


def test_paper_roles_include_the_time_embedding_mlp_and_code_loss_weights(unet, calib):
    _calibrated(unet, calib)
    paper = tla_objective(unet, TLAConfig(roles=("time_embed", "time_proj")))
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(paper.weight_layers)
    assert (paper.local_weight, paper.global_weight) == (1.0, 2.0)
    code = tla_objective(unet, TLAConfig(loss="code"))
    assert code.global_weight == len(code.hooked_layers) == 8
    assert tla_objective(unet, TLAConfig(global_loss=False)).global_weight == 0.0


def test_tla_config_validation():
    with pytest.raises(ValueError, match="subset of"):
        TLAConfig(roles=("ff",))
    with pytest.raises(ValueError, match="order"):
        TLAConfig(order="random")
