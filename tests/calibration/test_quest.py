"""QuEST methods: registration, options, bit-exact resume and save/load, the command line."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from builders import ddim_pipeline, tiny_unet2d
from foreign_builders import AttentionDenoiser, foreign_calibration
from quest_helpers import outputs_per_timestep

import questdiff as qd
from questdiff.calibration import BrecqConfig, CMAConfig, TLAConfig, quest
from questdiff.calibration.cma import cma_objective, critical_layers
from questdiff.calibration.methods import method_stages, share_stages
from questdiff.calibration.quest import resolve_options
from questdiff.nn.adaround import AdaRoundQuantizer
from questdiff.prepare import handle, quant_layers, weight_quantizers

TINY = {"brecq": BrecqConfig(iters=3, batch_size=4), "tla": TLAConfig(epochs=2, weight_lr=1e-3),
            "cma": CMAConfig(epochs=1, samples_per_t=4, weight_lr=1e-3, eval_samples_per_t=0)}


def _quest(model, calib, **kwargs):
    return qd.quantize(model, "W4A4", calib, "quest", progress=False, **{**TINY, **kwargs})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def quest_model(calib):
    return _quest(tiny_unet2d(), calib)


def test_methods_and_stages():
    names = {m: [s.name for s in method_stages(m)] for m in ("qdiffusion", "quest", "quest-tla", "quest-cma")}
    assert names["qdiffusion"] == ["weight_init", "brecq", "act_init"]
    assert names["quest"] == ["weight_init", "brecq", "act_init", "tla", "cma"]
    assert names["quest-tla"][-1] == "tla" and names["quest-cma"][-1] == "cma" and len(names["quest-cma"]) == 4


def test_options_resolve_and_fail_loudly():
    options = resolve_options({"tla": {"epochs": 3}, "global_loss": False}, "quest")
    assert options.tla.epochs == 3 and not options.tla.global_loss and not options.cma.global_loss
    assert options.brecq == BrecqConfig()
    with pytest.raises(ValueError, match="accepts"):
        resolve_options({"tla": TLAConfig()}, "qdiffusion")
    with pytest.raises(ValueError, match="TLAConfig fields"):
        resolve_options({"tla": {"epoch": 3}}, "quest")
    with pytest.raises(ValueError, match="order"):
        resolve_options({"brecq": {"order": "random"}}, "quest")


def test_quest_model_state(quest_model):
    h = handle(quest_model)
    assert h.stages == ["weight_init", "brecq", "act_init", "tla", "cma"]
    assert all(isinstance(q, AdaRoundQuantizer) and not q.soft for q in weight_quantizers(quest_model).values())
    assert all(layer.fp_weight is None for layer in quant_layers(quest_model).values())  # teacher copies released
    stats = h.extra["calibration"]
    assert stats["tla"]["steps"] == 2 * 4 * 4 and stats["cma"]["steps"] == 4
    assert {r["stage"] for r in h.extra["report"]} == set(h.stages)


def test_resumed_run_equals_uninterrupted_run_bit_exactly(calib, quest_model, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise RuntimeError("killed during CMA")

    with monkeypatch.context() as patch:
        patch.setattr(quest, "run_cma", killed)
        with pytest.raises(RuntimeError, match="killed"):
            _quest(tiny_unet2d(), calib, work_dir=tmp_path)
    assert max(p.name for p in (tmp_path / "stages").glob("*.safetensors")) == "03-tla.safetensors"
    resumed = _quest(tiny_unet2d(), calib, work_dir=tmp_path)
    report = handle(resumed).extra["report"]
    assert [r.get("resumed", False) for r in report] == [True, True, True, True, False]
    _assert_same(_state(resumed), _state(quest_model))
    assert torch.equal(outputs_per_timestep(resumed, calib), outputs_per_timestep(quest_model, calib))


def test_resume_refuses_a_work_dir_made_with_other_settings(calib, tmp_path):
    tla_only = {"brecq": TINY["brecq"], "tla": TINY["tla"]}

    def run(seed=0, **options):
        return qd.quantize(tiny_unet2d(seed), "W4A4", calib, "quest-tla", progress=False, work_dir=tmp_path, **options)

    run(**tla_only)
    with pytest.raises(ValueError, match=r"03-tla.*stages\.tla\.epochs: saved 2, now 3"):
        run(**{**tla_only, "tla": TLAConfig(epochs=3, weight_lr=1e-3)})
    with pytest.raises(ValueError, match="base_weights"):  # same architecture, other weights
        run(seed=1, **tla_only)
    assert all(r.get("resumed") for r in handle(run(**tla_only)).extra["report"])


def test_quest_resumes_the_stages_shared_from_a_qdiffusion_run(calib, quest_model, tmp_path):
    assert not share_stages(tmp_path / "base", tmp_path / "quest", "qdiffusion", "act_init")  # nothing finished yet
    qd.quantize(tiny_unet2d(), "W4A4", calib, "qdiffusion", progress=False, work_dir=tmp_path / "base", brecq=TINY["brecq"])
    assert share_stages(tmp_path / "base", tmp_path / "quest", "qdiffusion", "act_init")
    shared = _quest(tiny_unet2d(), calib, work_dir=tmp_path / "quest")
    assert [r.get("resumed", False) for r in handle(shared).extra["report"]] == [True, True, True, False, False]
    _assert_same(_state(shared), _state(quest_model))
    with pytest.raises(ValueError, match="no stage 'tla'"):
        share_stages(tmp_path / "base", tmp_path / "other", "qdiffusion", "tla")


def test_save_load_round_trip_is_bit_exact(calib, quest_model, tmp_path):
    qd.save(quest_model, tmp_path / "q")
    loaded = qd.load(tmp_path / "q", base=tiny_unet2d())
    assert handle(loaded).method == "quest"
    _assert_same(_state(loaded), _state(quest_model))
    assert torch.equal(outputs_per_timestep(loaded, calib), outputs_per_timestep(quest_model, calib))


def test_global_loss_ablation_option(unet, calib, quest_model):
    _quest(unet, calib, global_loss=False, cma=CMAConfig(epochs=1, samples_per_t=4, eval_samples_per_t=2))
    without, full = handle(unet).extra["calibration"], handle(quest_model).extra["calibration"]
    # the same seed gives TLA the same starting model in both runs: dropping the global output term lowers its
    # starting loss by exactly that term, which is positive for a W4A4 model
    assert 0 < without["tla"]["loss_before"] < full["tla"]["loss_before"]
    # CMA's objective drops it too
    family, layers = critical_layers(unet, calib, resolve_options({"global_loss": False}).cma, device="cpu")
    assert cma_objective(unet, layers, family, resolve_options({"global_loss": False}).cma).global_weight == 0.0
    assert cma_objective(unet, layers, family, resolve_options({}).cma).global_weight > 0.0
    assert 0 < without["cma"]["loss_before"] < float("inf")


def test_cli_quantize_quest(tmp_path):
    folder = tmp_path / "pipe"
    ddim_pipeline().save_pretrained(folder)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "questdiff.cli", "quantize", "--model", str(folder), "--method", "quest", "--preset", "W4A8",
           "--device", "cpu", "--calib-samples", "2", "--calib-steps", "2", "--steps", "4", "--recon-iters", "1",
           "--tla-epochs", "1", "--cma-epochs", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "questdiff quantize: done" in done.stdout and "cma" in done.stdout
    assert (out / "model.safetensors").is_file()  # and the stage files gave way to the record of the finished run
    assert [p.name for p in (out / "work" / "stages").iterdir()] == ["finished.json"]
    wrong = subprocess.run(cmd[:6] + ["--method", "rtn", "--recon-iters", "1", "--out", str(out)], capture_output=True,
                           text=True, env=env, timeout=300, check=False)
    assert wrong.returncode == 2 and "does not apply to method 'rtn'" in wrong.stderr


def test_quest_without_time_embedding_roles_fails_before_any_stage():
    model = AttentionDenoiser()
    with pytest.raises(ValueError, match=r"TLA trains the time-embedding layers \(roles \('time_proj',\)\) but no layer of "
                                         r"AttentionDenoiser plays them: name them, e.g. adapter=GenericAdapter\('t', roles="):
        qd.quantize(model, "W4A4", foreign_calibration(), "quest", adapter=qd.GenericAdapter("t"), progress=False, **TINY)
    assert not qd.is_quantized(model)  # failed in the preflight: nothing prepared, no stage ran
    named = qd.GenericAdapter("t", roles={"time_embed": ["time"]})
    with pytest.raises(ValueError, match=r"or train those: tla=TLAConfig\(roles=\('time_embed',\)\)"):
        qd.quantize(model, "W4A4", foreign_calibration(), "quest", adapter=named, progress=False, **TINY)


def test_quest_on_a_model_without_cma_roles_warns_first_and_runs_on_sensitivity():
    calib, adapter = foreign_calibration(), qd.GenericAdapter("t", roles={"time_embed": ["time"]})
    options = {**TINY, "tla": TLAConfig(roles=("time_embed",), epochs=1),
               "cma": CMAConfig(epochs=1, samples_per_t=2, eval_samples_per_t=0, top_k=2, sensitivity_samples=1)}
    model = AttentionDenoiser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="CMA trains the 2 layers most sensitive"):
            qd.quantize(model, "W4A4", calib, "quest", adapter=adapter, progress=False, **options)
    assert not qd.is_quantized(model)  # the warning came from the preflight, before prepare
    with pytest.warns(UserWarning, match="CMA trains the 2 layers most sensitive"):
        qd.quantize(model, "W4A4", calib, "quest", adapter=adapter, progress=False, **options)
    assert handle(model).stages == ["weight_init", "brecq", "act_init", "tla", "cma"]
