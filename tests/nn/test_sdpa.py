"""Quantized F.scaled_dot_product_attention calls: SDPA semantics, per-call routing, FP when disabled, call-count
checks, deep copies."""
import copy

import pytest
import torch
import torch.nn.functional as F
from foreign_builders import AttentionDenoiser, foreign_calibration

import questdiff as qd
from questdiff.config import ActivationSpec
from questdiff.nn import ActQuantizer
from questdiff.nn.sdpa import SDPA_ATTR, AttentionCallError, AttentionSite
from questdiff.timestep import TimestepSchedule, TimestepState
from builders import CHANNEL_W4A4

STATE = TimestepState(TimestepSchedule((500.0,)))


def _fine_site(dim: int) -> AttentionSite:
    """16-bit quantizers (range +-6.5 in steps of 2e-4, probabilities in steps of 1/65535): far finer than the tolerance."""
    spec = ActivationSpec(bits=16)
    qs = [ActQuantizer(1, spec, STATE, dim, -1) for _ in range(3)]
    for q in qs:
        q.set_row(0, torch.full((1,), 2e-4), torch.full((1,), 32768.0))
    probs = ActQuantizer(1, spec, STATE, always_zero=True)
    probs.set_row(0, torch.tensor(1 / 65535), torch.tensor(0.0))
    return AttentionSite(*qs, probs)


@pytest.mark.parametrize("options", [
    {},
    {"is_causal": True},
    {"scale": 0.3},
    {"attn_mask": torch.rand(5, 7) > 0.3},
    {"attn_mask": torch.randn(2, 1, 5, 7)},
    {"enable_gqa": True},
])
def test_quantized_call_follows_sdpa_semantics(options):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    kv_heads = 2 if options.get("enable_gqa") else 4
    k, v = torch.randn(2, kv_heads, 7, 8, generator=g), torch.randn(2, kv_heads, 7, 8, generator=g)
    if options.get("attn_mask") is not None and options["attn_mask"].dtype == torch.bool:
        options["attn_mask"][:, 0] = True  # no fully masked row
    site = _fine_site(8)
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    assert torch.allclose(site.attend((q, k), {"value": v, **options}), expected, atol=2e-3)
    for quantizer in site.act_quantizers():
        quantizer.enabled = False
    assert torch.equal(site.attend((q, k, v), options), expected)  # disabled: the original call, bit for bit


QKVP_W4A4 = CHANNEL_W4A4.replace(attention="qkvp")  # QuEST's format and grids: these tests read the probability quantizers


@pytest.fixture(scope="module")
def quantized():
    model, calib = AttentionDenoiser().eval(), foreign_calibration()
    fp = copy.deepcopy(model)
    qd.quantize(model, QKVP_W4A4, calib, adapter=qd.GenericAdapter("t"), progress=False)
    return fp, model, calib


def test_each_call_gets_its_own_quantizers(quantized):
    _, model, calib = quantized
    router = getattr(model, SDPA_ATTR)
    assert router.owners == ["blocks.0", "blocks.1", ""]  # blocks.0 runs twice: its sites serve each run
    widths = [site.q_quantizer.scale.shape for site in router.sites]
    assert widths == [(3, 8), (3, 4), (3, 16)]  # rows = calibrated timesteps, channels = head_dim (4-bit: per channel)
    qk = AttentionDenoiser().eval()
    qd.quantize(qk, "W4A4", calib, adapter=qd.GenericAdapter("t"), progress=False)  # the default "qk" format
    for site in getattr(qk, SDPA_ATTR).sites:  # q and k per tensor at 8 bits, symmetric; v and P unquantized
        assert site.format == "qk" and site.v_quantizer is None and site.probs_quantizer is None
        assert all(q.bits == 8 and q.symmetric and q.scale.shape == (3, 1) for q in site.act_quantizers())
    seen = []
    hooks = [site.probs_quantizer.register_forward_pre_hook(lambda m, a, i=i: seen.append(i)) for i, site in enumerate(router.sites)]
    with torch.no_grad():
        model(**calib.model_kwargs(slice(0, 2)))
    for h in hooks:
        h.remove()
    assert seen == [0, 0, 1, 2]
    for site in router.sites:  # activation init filled every row of every quantizer
        assert all(not torch.all(q.scale == 1) for q in site.act_quantizers())


def test_disabled_quantization_is_the_fp_model_and_enabled_attention_changes_it(quantized):
    fp, model, calib = quantized
    kwargs = calib.model_kwargs(slice(0, 4))
    with torch.no_grad():
        reference = fp(**kwargs)
        with qd.quant_state(model, weight=False, act=False):
            assert torch.equal(model(**kwargs), reference)
            for site in getattr(model, SDPA_ATTR).sites:  # only the attention operands quantized
                for q in site.act_quantizers():
                    q.enabled = True
            only_attention = model(**kwargs)
    assert not torch.equal(only_attention, reference)
    assert torch.allclose(only_attention, reference, atol=0.5 * reference.abs().max().item())


def test_a_changed_call_count_raises(quantized):
    _, model, calib = quantized
    copy_ = copy.deepcopy(model)
    copy_.manual = True  # the forward's own causal SDPA call is skipped now
    with pytest.raises(AttentionCallError, match="the denoiser's forward made 0 scaled_dot_product_attention call"):
        with torch.no_grad():
            copy_(**calib.model_kwargs(slice(0, 1)))
    assert getattr(copy_, SDPA_ATTR)._stack == []  # nothing left routed after the error


def test_deep_copy_routes_its_own_quantizers(quantized):
    _, model, calib = quantized
    twin = copy.deepcopy(model)
    kwargs = calib.model_kwargs(slice(0, 2))
    with torch.no_grad():
        before = model(**kwargs)
        assert torch.equal(twin(**kwargs), before)
        for site in getattr(twin, SDPA_ATTR).sites:
            site.probs_quantizer.scale.mul_(4.0)  # coarser probabilities in the copy only
        assert not torch.equal(twin(**kwargs), before)
        assert torch.equal(model(**kwargs), before)


def test_no_sites_without_attention_quantization():
    model = AttentionDenoiser().eval()
    qd.quantize(model, qd.presets.W8A8.replace(quantize_attention=False), foreign_calibration(),
                adapter=qd.GenericAdapter("t"), progress=False)
    assert not hasattr(model, SDPA_ATTR)


def test_save_load_restores_every_site(quantized, tmp_path):
    fp, model, calib = quantized
    qd.save(model, tmp_path / "q")
    loaded = qd.load(tmp_path / "q", base=copy.deepcopy(fp), adapter=qd.GenericAdapter("t"))
    assert getattr(loaded, SDPA_ATTR).owners == getattr(model, SDPA_ATTR).owners
    kwargs = calib.model_kwargs(slice(0, 3))
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs), model(**kwargs))
