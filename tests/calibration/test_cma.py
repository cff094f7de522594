"""CMA: trains only the critical layers and the non-time-embedding scales, lowers its loss; family defaults."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from foreign_builders import AttentionDenoiser, foreign_calibration
from quest_helpers import synthetic_calibration
from torch import nn

import questdiff as qd
from questdiff.adapters import TIME_EMBEDDING_ROLES
from questdiff.calibration import BrecqConfig, CalibrationSet, CMAConfig, run_cma
from questdiff.calibration.cma import (
    CRITICAL_ROLES,
    cma_objective,
    critical_layers,
    detect_family,
    model_family,
)
from questdiff.prepare import act_quantizers, handle


def _calibrated(model, calib, name="W4A4"):
    return qd.quantize(model, name, calib, "qdiffusion", progress=False, brecq=BrecqConfig(iters=2, batch_size=4))


def test_cma_touches_only_critical_layers_and_non_time_embedding_scales(unet, calib):
    _calibrated(unet, calib)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    run_cma(unet, calib, CMAConfig(epochs=1, samples_per_t=8, weight_lr=1e-3, eval_samples_per_t=0), progress=False)
    after = unet.state_dict()
    h = handle(unet)
    critical = [n for n, info in h.layers.items() if info.has_role(CRITICAL_ROLES["unconditional"])]
    assert len(critical) == 12  # q, k, v of 4 attention blocks
    owned = {f"{n}.{p}" for n in critical for p in ("weight", "bias")}
    te_scales = {f"{n}.scale" for n, q in act_quantizers(unet).items()
                 if any(n.startswith(layer + ".") for layer, info in h.layers.items() if info.has_role(TIME_EMBEDDING_ROLES))}
    scales = {f"{n}.scale" for n in act_quantizers(unet)} - te_scales
    assert len(te_scales) == 10
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= owned | scales
    assert owned <= changed and len(changed & scales) > len(scales) // 2
    assert not changed & te_scales


@pytest.mark.parametrize("order", ["shuffled", "mixed"])
def test_cma_lowers_its_loss(unet, calib, order):
    _calibrated(unet, calib)
    config = CMAConfig(epochs=3, samples_per_t=16, batch_size=8, weight_lr=1e-3, eval_samples_per_t=16, order=order)
    result = run_cma(unet, calib, config, progress=False)
    print(f"CMA loss (tiny UNet W4A4, 3 epochs, {order}): {result.loss_before:.4f} -> {result.loss_after:.4f}")
    assert result.loss_after < result.loss_before


def test_model_family_and_default_critical_roles(unet, calib, cond_unet, cond_calib):
    _calibrated(unet, calib, "W8A8")
    assert model_family(unet, calib) == "unconditional"
    _calibrated(cond_unet, cond_calib, "W8A8")
    assert model_family(cond_unet, cond_calib) == "class"
    family, layers = critical_layers(cond_unet, cond_calib, CMAConfig(), device=torch.device("cpu"))
    roles = set().union(*(handle(cond_unet).layers[n].roles for n in layers))
    assert family == "class" and roles == {"ff", "attn.self.q", "attn.cross.q", "attn.self.k", "attn.self.v"}
    text_calib = synthetic_calibration(2, shape=(4, 8, 8), context=(5, 32))
    assert model_family(cond_unet, text_calib) == "text"


def test_code_loss_variant_and_sensitivity_choice(unet, calib):
    _calibrated(unet, calib)
    objective = cma_objective(unet, ["mid_block.attentions.0.to_q"], "unconditional", CMAConfig(loss="code"))
    assert (objective.local_weight, objective.global_weight) == (0.0, 1.0)
    assert cma_objective(unet, ["x"], "text", CMAConfig(loss="code")).local_weight == 1.0
    _, layers = critical_layers(unet, calib, CMAConfig(critical="sensitivity", top_k=3, sensitivity_samples=2),
                                     device=torch.device("cpu"))
    assert len(layers) == 3
    assert not any(handle(unet).layers[n].has_role(TIME_EMBEDDING_ROLES) for n in layers)


def test_cma_config_validation():
    with pytest.raises(ValueError, match="time-embedding"):
        CMAConfig(critical=("time_proj",))
    with pytest.raises(ValueError, match="critical"):
        CMAConfig(critical="everything")



def test_roles_no_layer_plays_raise_or_fall_back_to_sensitivity():
    model, calib, cpu = AttentionDenoiser(), foreign_calibration(), torch.device("cpu")
    qd.quantize(model, "W8A8", calib, "rtn", adapter=qd.GenericAdapter("t"), progress=False)
    with pytest.raises(ValueError, match=r"plays the CMA roles \('ff',\): name them, e.g. adapter=GenericAdapter\('t', roles=\{'ff'"):
        critical_layers(model, calib, CMAConfig(critical=("ff",)), device=cpu)
    with pytest.warns(UserWarning, match=r"CMA trains the 2 layers most sensitive to 4-bit inputs instead"):
        family, layers = critical_layers(model, calib, CMAConfig(top_k=2, sensitivity_samples=1), device=cpu)
    assert family == "unconditional" and len(layers) == 2


def _with_input(calib, name, value):
    return CalibrationSet({**calib.inputs, name: value}, calib.steps, calib.sample_key, calib.timestep_key)


def test_class_label_through_an_embedding_is_the_class_family(calib):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=4).eval()
    labelled = _with_input(calib, "class_labels", torch.arange(len(calib)) % 4)
    qd.quantize(unet, "W8A8", labelled, progress=False)
    assert model_family(unet, labelled) == "class"  # no cross-attention: the label enters through nn.Embedding
    family, layers = critical_layers(unet, labelled, CMAConfig(), device=torch.device("cpu"))
    roles = set().union(*(handle(unet).layers[n].roles for n in layers))
    assert family == "class" and roles == {"attn.self.q", "attn.self.k", "attn.self.v"}  # the class roles it has


def test_family_of_foreign_models_from_their_inputs_and_roles():
    model, calib = AttentionDenoiser(), foreign_calibration()
    adapter = qd.GenericAdapter("t")
    layers = adapter.layers(model)
    assert detect_family(model, adapter, layers, calib) == "unconditional"
    assert detect_family(model, adapter, layers, _with_input(calib, "y", torch.arange(len(calib)))) == "class"
    constant = torch.ones(len(calib), 3)  # a tensor every row shares conditions nothing
    assert detect_family(model, adapter, layers, _with_input(calib, "scale", constant)) == "unconditional"
    assert detect_family(model, adapter, layers, _with_input(calib, "y", torch.randn(len(calib), 8))) == "class"
    assert detect_family(model, adapter, layers, _with_input(calib, "context", torch.randn(len(calib), 5, 8))) == "text"
    cond = qd.GenericAdapter("t", roles={"cond": [nn.Linear]})
    assert detect_family(model, cond, cond.layers(model), calib) == "class"  # a conditioning embedding named by role
