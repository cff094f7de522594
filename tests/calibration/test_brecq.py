"""BRECQ: units in forward order, every weight hard-rounded afterwards, loss below round-to-nearest, data orders."""
from __future__ import annotations

import math

import pytest
import torch
from builders import tiny_unet2d
from rank_jobs import brecq_unit
from ranks import run_ranks

import questdiff as qd
from questdiff.calibration import brecq
from questdiff.calibration.adaround import AdaRoundConfig
from questdiff.calibration.brecq import (
    BrecqConfig,
    _batch_index,
    capture,
    reconstruct,
    reconstruction_units,
    unit_loss,
)
from questdiff.calibration.brecq import capture as brecq_capture  # the original, for the spy
from questdiff.calibration.weights import init_weights
from questdiff.config import preset
from questdiff.nn.adaround import AdaRoundQuantizer
from questdiff.prepare import handle, prepare, quant_state, weight_quantizers
from questdiff.timestep import TimestepSchedule


def _prepared(unet, calib, name="W4A8"):
    prepare(unet, preset(name), TimestepSchedule.from_timesteps(calib.timesteps))
    init_weights(unet)
    return unet


def test_units_are_blocks_and_loose_layers_in_forward_order(unet, calib):
    _prepared(unet, calib)
    units = reconstruction_units(unet, calib, torch.device("cpu"))
    blocks = handle(unet).adapter.blocks(unet)
    assert set(blocks) <= set(units)
    assert units[:3] == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in"]
    assert units[-1] == "conv_out"
    assert units.index("down_blocks.0.downsamplers.0.conv") == units.index("down_blocks.0.resnets.0") + 1
    covered = {n for n in handle(unet).layers if any(n == u or n.startswith(u + ".") for u in units)}
    assert covered == set(handle(unet).layers)


def test_reconstruction_hard_rounds_everything_and_beats_rtn(unet, calib):
    _prepared(unet, calib)
    results = reconstruct(unet, calib, BrecqConfig(iters=40, batch_size=8, lr=1e-2), batch_size=32, progress=False)
    assert len(results) == 18
    rtn, ada = sum(r.rtn_loss for r in results), sum(r.loss for r in results)
    print(f"BRECQ tiny UNet W4 (40 iters/unit): sum of unit losses RTN {rtn:.4f} -> AdaRound {ada:.4f}")
    assert ada < rtn
    assert sum(r.loss < r.rtn_loss for r in results) >= len(results) * 2 // 3
    quantizers = weight_quantizers(unet)
    assert all(isinstance(q, AdaRoundQuantizer) and not q.soft for q in quantizers.values())


def test_sequential_order_sweeps_timestep_shards():
    config = BrecqConfig(iters=100, batch_size=4, order="sequential", num_shards=4)
    g = torch.Generator().manual_seed(0)
    shards = [set(_batch_index(step, config, 64, g).tolist()) for step in (0, 24, 25, 99)]
    assert shards[0] <= set(range(16)) and shards[1] <= set(range(16))
    assert shards[2] <= set(range(16, 32)) and shards[3] <= set(range(48, 64))
    iid = BrecqConfig(batch_size=4)
    seen = set().union(*(_batch_index(step, iid, 64, g).tolist() for step in range(40)))
    assert len(seen & set(range(48, 64))) > 0 and len(seen & set(range(16))) > 0


def test_cpu_bf16_storage_and_sample_cap(calib, monkeypatch):
    captures = []

    def spy(*args, **kwargs):
        captures.append((args[3], brecq_capture(*args, **kwargs)))  # (row parts, Captured)
        return captures[-1][1]

    monkeypatch.setattr(brecq, "capture", spy)

    def run(**storage):
        config = BrecqConfig(iters=2, batch_size=4, max_samples=8, order="sequential", **storage)
        return reconstruct(_prepared(tiny_unet2d(), calib), calib, config, progress=False)

    fp32 = run()
    captures.clear()
    bf16 = run(storage="cpu", storage_dtype="bfloat16")
    # the cap: 8 rows, spread evenly (2 of each of the 4 timesteps)
    for parts, captured in captures:
        assert captured.count == 8 and [len(p) for p in parts] == [2, 2, 2, 2]
        assert [len(set(calib.ts[p].tolist())) for p in parts] == [1, 1, 1, 1]
    floats = [leaf for _, c in captures for leaf, batched in zip(c.leaves, c.batched) if batched and leaf.is_floating_point()]
    assert floats and all(leaf.dtype == torch.bfloat16 and leaf.device.type == "cpu" for leaf in floats)
    # bfloat16 storage moves the losses only by its rounding (about 3 significant digits)
    assert [r.name for r in bf16] == [r.name for r in fp32]
    for a, b in zip(fp32, bf16):
        assert math.isfinite(b.loss) and b.rtn_loss == pytest.approx(a.rtn_loss, rel=0.05, abs=1e-6), a.name


def test_qdiffusion_method_runs_its_stages(unet, calib):
    qd.quantize(unet, "W4A8", calib, "qdiffusion", progress=False, brecq=BrecqConfig(iters=2, batch_size=4))
    h = handle(unet)
    assert h.stages == ["weight_init", "brecq", "act_init"]
    assert h.extra["calibration"]["brecq"]["units"] == 18
    assert [r["stage"] for r in h.extra["report"]] == h.stages


@pytest.mark.parametrize("name, block", [("flux", "transformer_blocks.0"), ("sd3", "transformer_blocks.1")])
def test_units_with_two_streams_reconstruct_the_image_stream(tmp_path, name, block):
    """FLUX / SD3 blocks return ``(context, image)``; SD3's last block ``(None, image)``: the image stream counts."""
    from builders_transformers import PROMPTS, tiny_flux_pipeline, tiny_sd3_pipeline

    pipe, size = (tiny_flux_pipeline(tmp_path), 16) if name == "flux" else (tiny_sd3_pipeline(tmp_path), 8)
    calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=2, num_inference_steps=4, progress=False,
                                   prompts=PROMPTS, height=size, width=size, max_sequence_length=8)
    model = _prepared(pipe.transformer, calib, "W8A8")
    unit = model.get_submodule(block)
    parts = [torch.arange(len(calib))]
    device = torch.device("cpu")
    kwargs = {"device": device, "batch_size": 4, "storage": device}
    with quant_state(model, weight=False, act=False):
        inputs = capture(model, unit, calib, parts, what="input", **kwargs)
        targets = capture(model, unit, calib, parts, what="output", **kwargs)
        assert unit_loss(unit, inputs, targets, device) == 0
        with torch.no_grad():
            unit.ff.net[2].bias.add_(0.1)  # the image stream's feed-forward only
        assert unit_loss(unit, inputs, targets, device) > 1e-3


def test_two_ranks_reconstruct_a_unit_as_one_process(calib):
    # capture: 64 rows in batches of 16, two batches per rank; AdaRound: batches of 7 rows, 3 on rank 0 and 4 on
    # rank 1; the regulariser is on after 3 of 12 iterations; the unit losses: 32 rows per rank
    config = BrecqConfig(iters=12, batch_size=7, lr=1e-2, adaround=AdaRoundConfig(warmup=0.25))
    alone = brecq_unit(calib, "down_blocks.1.resnets.0", config)
    ranks = run_ranks(brecq_unit, calib, "down_blocks.1.resnets.0", config)
    assert alone["rows_captured"] == 2 * 64 and [r["rows_captured"] for r in ranks] == [64, 64]
    assert alone["rows_run"] == 2 * 64 + 12 * 7
    assert [r["rows_run"] for r in ranks] == [2 * 32 + 12 * 3, 2 * 32 + 12 * 4]
    for result in ranks:  # every rank holds every captured row, bit for bit
        for key in ("inputs", "targets"):
            assert len(result[key]) == len(alone[key])
            assert all(torch.equal(a, b) for a, b in zip(result[key], alone[key]) if isinstance(a, torch.Tensor))
    assert len(alone["alphas"]) == 4
    for a, b, c in zip(alone["alphas"], ranks[0]["alphas"], ranks[1]["alphas"]):
        assert torch.equal(b, c)  # the replicas stay in step: every rank applies the same summed gradient
        # one process sums a batch's 7 rows at once, two ranks 3 + 4: the same gradient up to addition order
        # (BRECQ quantizes no activations, so no rounding boundary turns last bits into steps; measured 6e-7)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert torch.equal(b >= 0, a >= 0)  # the same rounding decisions
    assert ranks[0]["loss"] == ranks[1]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
