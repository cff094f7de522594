import torch

import questdiff as qd
from questdiff.calibration.weights import init_weights
from questdiff.nn import QuantAttnProcessor
from questdiff.prepare import prepare, set_quant_state
from questdiff.timestep import TimestepSchedule

from builders import tiny_cond_unet
from questdiff.nn.attention import _attend as _ATTEND
from builders import CHANNEL_W4A4
from questdiff.config import resolve


def _prepared(preset="W8A8", attention="qkvp"):
    unet = tiny_cond_unet()
    prepare(unet, resolve(preset).replace(attention=attention), TimestepSchedule((900.0, 500.0, 100.0)))
    return unet


def test_processors_installed_with_self_and_cross_quantizers():
    unet = _prepared(CHANNEL_W4A4)
    procs = {n: p for n, p in unet.attn_processors.items()}
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs.values())
    p = next(iter(procs.values()))
    assert p.probs_quantizer.bits == 8 and p.probs_quantizer.always_zero and not p.probs_quantizer.symmetric
    attn = unet.get_submodule(next(iter(procs)).rsplit(".", 1)[0])
    head_dim = attn.to_q.out_features // attn.heads
    assert p.q_quantizer.per_channel and p.q_quantizer.scale.shape == (3, head_dim)  # channel = head_dim at 4 bits
    keys = [k for k in unet.state_dict() if "processor.q_quantizer.scale" in k]
    assert len(keys) == len(procs)
    for p in _prepared("W4A4", attention="qk").attn_processors.values():  # the default format
        assert p.format == "qk" and p.v_quantizer is None and p.probs_quantizer is None
        assert all(q.bits == 8 and q.symmetric and not q.per_channel for q in p.act_quantizers())


def test_qk_format_centres_the_keys_and_leaves_p_and_v_in_float():
    """With a fine grid on q and k only, the "qk" attention is the FP attention: centring k changes no softmax."""
    unet = _prepared(attention="qk")
    set_quant_state(unet, False, False)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32) + 3.0, torch.tensor([500, 500])  # keys far from 0
    seen = []
    with torch.no_grad():
        ref = unet(x, t, c).sample
        for p in unet.attn_processors.values():
            p.k_quantizer.register_forward_pre_hook(lambda m, a: seen.append(a[0].mean(dim=1).abs().max()))
            for q in p.act_quantizers():
                q.scale.fill_(1e-4)
                q.qmin, q.qmax = -(2**15), 2**15 - 1
            p.set_quant_state(True)
        out = unet(x, t, c).sample
    assert seen and max(seen) < 1e-5  # the k quantizer sees keys with a zero token mean
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_quantized_attention_matches_fp_math_with_fine_scales():
    unet = _prepared()
    set_quant_state(unet, False, False)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32), torch.tensor([500, 500])
    with torch.no_grad():
        ref = unet(x, t, c).sample
        for p in unet.attn_processors.values():  # only attention operands quantized, with a very fine grid
            for q in p.act_quantizers():
                q.scale.fill_(1e-4)  # 16-bit grid over [-3.3, 3.3]
                q.zero_point.fill_(0 if q.always_zero else 2**15)
                q.qmin, q.qmax = 0, 2**16 - 1 if not q.always_zero else 2**16 - 1
            p.set_quant_state(True)
        calls = []
        hooks = [q.register_forward_hook(lambda *a: calls.append(1)) for p in unet.attn_processors.values() for q in p.act_quantizers()]
        out = unet(x, t, c).sample
    for h in hooks:
        h.remove()
    assert len(calls) == len(hooks)  # every operand went through its quantizer once
    assert torch.allclose(out, ref, atol=1e-3)


def _grads_after_state_moved_on(unet, monkeypatch, min_elements):
    """Loss gradients when the quantizers are switched off between forward and backward (as finetuning does)."""
    from questdiff.nn import attention

    calls = []
    monkeypatch.setattr(attention, "RECOMPUTE_MIN_ELEMENTS", min_elements)
    monkeypatch.setattr(attention, "_attend", lambda *a: calls.append(1) or _ATTEND(*a))
    unet.zero_grad(set_to_none=True)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32), torch.tensor([900, 100])  # one scale row per sample
    set_quant_state(unet, True, True)
    loss = unet(x, t, c).sample.square().mean()
    set_quant_state(unet, False, False)
    loss.backward()
    scales = {n: p.grad.clone() for n, p in unet.named_parameters() if "processor" in n and p.grad is not None}
    return loss.detach(), scales, len(calls)


def test_large_attention_is_recomputed_in_backward_with_the_same_gradients(monkeypatch):
    unet = _prepared(CHANNEL_W4A4)
    init_weights(unet)
    with torch.no_grad():  # in-range scales, so the gradients are not all zero
        for p in unet.attn_processors.values():
            for q in p.act_quantizers():
                q.scale.fill_(1 / 255 if q.always_zero else 0.3)
                q.zero_point.fill_(0 if q.always_zero or q.symmetric else 8)
    torch.manual_seed(0)
    stored = _grads_after_state_moved_on(unet, monkeypatch, min_elements=2**40)
    torch.manual_seed(0)
    recomputed = _grads_after_state_moved_on(unet, monkeypatch, min_elements=1)
    layers = len(unet.attn_processors)
    assert stored[2] == layers and recomputed[2] == 2 * layers  # recompute: once more per layer, in backward
    assert torch.equal(stored[0], recomputed[0])
    assert stored[1].keys() == recomputed[1].keys() and any(g.abs().sum() > 0 for g in stored[1].values())
    for name, grad in stored[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-5, atol=1e-8, msg=name)
