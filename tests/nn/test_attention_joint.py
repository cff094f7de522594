import copy

import pytest
import torch

import questdiff as qd
from questdiff.calibration.weights import init_weights
from questdiff.nn import QuantFluxAttnProcessor, QuantJointAttnProcessor, attention_joint
from questdiff.prepare import prepare, set_quant_state
from questdiff.timestep import TimestepSchedule

from builders_transformers import PROMPTS, tiny_flux_pipeline, tiny_sd3_pipeline
from builders import CHANNEL_W4A4
from questdiff.config import resolve

ATTN_QUANT = attention_joint.quantized_sdpa


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``name -> (FP transformer, model kwargs of 2 recorded calls, calibrated timesteps)``."""
    tmp = tmp_path_factory.mktemp("tok")
    out = {}
    for name, pipe, size in (("sd3", tiny_sd3_pipeline(tmp), 8), ("flux", tiny_flux_pipeline(tmp), 16)):
        calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=3, num_inference_steps=6, progress=False,
                                       prompts=PROMPTS, height=size, width=size, max_sequence_length=8)
        out[name] = (pipe.transformer, calib, calib.model_kwargs(torch.tensor([0, len(calib) - 1])))
    return out


def _prepared(cases, name, preset="W8A8", attention="qkvp"):
    fp, calib, kwargs = cases[name]
    model = copy.deepcopy(fp)
    prepare(model, resolve(preset).replace(attention=attention), TimestepSchedule.from_timesteps(calib.timesteps))
    return fp, model, kwargs


def _processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor") and hasattr(m.processor, "act_quantizers")]


@pytest.mark.parametrize("name, cls, count", [("sd3", QuantJointAttnProcessor, 3), ("flux", QuantFluxAttnProcessor, 2)])
def test_disabled_is_the_fp_model_bit_for_bit(cases, name, cls, count):
    fp, model, kwargs = _prepared(cases, name, CHANNEL_W4A4)
    procs = _processors(model)
    assert len(procs) == count and all(type(p) is cls for p in procs)
    p = procs[0]
    assert p.q_quantizer.per_channel and p.q_quantizer.scale.shape == (3, 8)  # [T, head_dim] at 4 bits
    assert p.probs_quantizer.bits == 8 and p.probs_quantizer.always_zero and not p.probs_quantizer.per_channel
    set_quant_state(model, False, False)
    with torch.no_grad():
        assert torch.equal(model(**kwargs)[0], fp(**kwargs)[0])
    _, qk, _ = _prepared(cases, name, "W4A4", attention="qk")  # the default format: q and k only, per tensor
    assert all(p.format == "qk" and not p.q_quantizer.per_channel and p.probs_quantizer is None for p in _processors(qk))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_quantized_attention_matches_fp_math_with_fine_scales(cases, name):
    fp, model, kwargs = _prepared(cases, name)
    set_quant_state(model, False, False)
    procs = _processors(model)
    with torch.no_grad():
        ref = fp(**kwargs)[0]
        for p in procs:  # only attention operands quantized, on a 16-bit grid over [-3.3, 3.3]
            for q in p.act_quantizers():
                q.scale.fill_(1e-4)
                q.zero_point.fill_(0 if q.always_zero else 2**15)
                q.qmin, q.qmax = 0, 2**16 - 1
            p.set_quant_state(True)
        calls = []
        hooks = [q.register_forward_hook(lambda *a: calls.append(1)) for p in procs for q in p.act_quantizers()]
        out = model(**kwargs)[0]
        for p in procs:  # a coarse grid changes the output: the quantizers act on the real operands
            p.q_quantizer.scale.fill_(0.5)
        coarse = model(**kwargs)[0]
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(hooks)  # every operand of every attention went through its quantizer
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)
    assert (coarse - ref).abs().max() > 1e-2


def _grads_after_state_moved_on(model, kwargs, monkeypatch, min_elements):
    calls = []
    monkeypatch.setattr(attention_joint, "RECOMPUTE_MIN_ELEMENTS", min_elements)
    monkeypatch.setattr(attention_joint, "_attend", lambda *a: calls.append(1) or ATTEND(*a))
    model.zero_grad(set_to_none=True)
    set_quant_state(model, True, True)
    loss = model(**kwargs)[0].square().mean()
    set_quant_state(model, False, False)  # as finetuning does between forward and backward
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "processor" in n and p.grad is not None}
    return loss.detach(), grads, len(calls)


ATTEND = attention_joint._attend


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_large_attention_is_recomputed_in_backward_with_the_same_gradients(cases, name, monkeypatch):
    _, model, kwargs = _prepared(cases, name, CHANNEL_W4A4)
    init_weights(model)
    with torch.no_grad():  # in-range scales, so the gradients are not all zero
        for p in _processors(model):
            for q in p.act_quantizers():
                q.scale.fill_(1 / 255 if q.always_zero else 0.3)
                q.zero_point.fill_(0 if q.always_zero or q.symmetric else 8)
    assert kwargs["timestep"][0] != kwargs["timestep"][1]  # two timesteps: per-sample scale rows
    stored = _grads_after_state_moved_on(model, kwargs, monkeypatch, 2**40)
    recomputed = _grads_after_state_moved_on(model, kwargs, monkeypatch, 1)
    layers = len(_processors(model))
    assert stored[2] == layers and recomputed[2] == 2 * layers  # recompute: once more per attention, in backward
    assert torch.equal(stored[0], recomputed[0])
    assert stored[1].keys() == recomputed[1].keys() and any(g.abs().sum() > 0 for g in stored[1].values())
    for key, grad in stored[1].items():
        torch.testing.assert_close(recomputed[1][key], grad, rtol=1e-5, atol=1e-8, msg=key)
        rows = grad.abs().sum(dim=tuple(range(1, grad.ndim)))
        assert rows[1] == 0  # the middle calibrated timestep is in neither sample: its row gets no gradient


def test_masked_scores_follow_sdpa():
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    identity = (torch.nn.Identity(),) * 4
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    for m in (mask, torch.where(mask, 0.0, -1e4)):
        torch.testing.assert_close(ATTEND(q, k, v, m, identity),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m))
