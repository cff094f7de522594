"""End-to-end on tiny diffusion-transformer pipelines (DiT, PixArt-alpha, SD3.5, FLUX): collect -> quantize with rtn /
qdiffusion / quest -> sample with another scheduler -> save / load bit-exact, with roles and attention coverage."""
import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import questdiff as qd
from questdiff import pipelines
from questdiff.nn import ActQuantizer, QuantLayerMixin

from builders_transformers import PROMPTS, tiny_dit_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

TEXT = {"prompts": PROMPTS, "max_sequence_length": 8}
CASES = {  # builder, collect/sampling kwargs, the other scheduler, roles that must be present
    "dit": (lambda tmp: tiny_dit_pipeline(), {}, lambda pipe: pipelines.set_scheduler(pipe, "dpm++"),
            {"attn.self.q", "time_embed", "time_proj", "ff", "first", "last"}),
    "pixart": (tiny_pixart_pipeline, {**TEXT, "height": 8, "width": 8, "use_resolution_binning": False, "clean_caption": False},
               lambda pipe: pipelines.set_scheduler(pipe, "dpm++"),
               {"attn.self.q", "attn.cross.k", "time_embed", "time_proj", "cond", "ff", "first", "last"}),
    "sd3": (tiny_sd3_pipeline, {**TEXT, "height": 8, "width": 8},
            lambda pipe: setattr(pipe, "scheduler", DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")),
            {"attn.joint.q", "attn.joint.context.v", "attn.self.k", "time_embed", "time_proj", "cond", "ff"}),
    "flux": (tiny_flux_pipeline, {**TEXT, "height": 16, "width": 16},
             lambda pipe: setattr(pipe, "scheduler", FlowMatchEulerDiscreteScheduler(shift=2.0)),
             {"attn.joint.k", "attn.joint.context.out", "attn.self.v", "time_embed", "time_proj", "cond", "ff"}),
}
OPTIONS = {
    "rtn": {},
    "qdiffusion": {"brecq": {"iters": 2}},
    "quest": {"brecq": {"iters": 2}, "tla": {"epochs": 1, "samples_per_t": 2}, "cma": {"epochs": 1, "samples_per_t": 2}},
}


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """``name -> (pipeline, FP transformer copy, calibration set)``, built once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            build, kwargs, _, _ = CASES[name]
            pipe = build(tmp_path_factory.mktemp(name))
            calib = qd.collect_calibration(pipe, num_samples=2, calib_steps=3, num_inference_steps=6, progress=False,
                                           **kwargs)
            cache[name] = (pipe, copy.deepcopy(pipe.transformer), calib)
        return cache[name]

    return get


def _fired(model, kwargs):
    """Names of the quantizers (activation and weight) that one forward calls."""
    names = {q: n for n, q in model.named_modules() if isinstance(q, ActQuantizer)}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayerMixin):
            names.update({q: f"{name}.{i}" for i, q in enumerate(layer.weight_quantizers())})
    fired = set()
    hooks = [q.register_forward_hook(lambda m, *a: fired.add(names[m])) for q in names]
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return fired, set(names.values())


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_collect_quantize_sample_save_load(collected, name, method, tmp_path):
    pipe, fp, calib = collected(name)
    _, kwargs, swap_scheduler, roles = CASES[name]
    assert len(calib.timesteps) == 3 and calib.timestep_key == "timestep"
    model = qd.quantize(copy.deepcopy(fp), "W8A8", calib, method, progress=False, **OPTIONS[method])
    h = qd.handle(model)
    assert roles <= set().union(*(info.roles for info in h.layers.values()))
    assert h.stages and h.method == method

    # coverage: every quantized layer and every attention matmul operand is quantized in a forward
    rows = calib.model_kwargs(torch.arange(2))
    fired, every = _fired(model, rows)
    assert fired == every
    attentions = {n: m.processor for n, m in model.named_modules() if hasattr(m, "to_q") and hasattr(m, "processor")}
    names = {id(q): n for n, q in model.named_modules()}
    assert attentions and all(p.format == "qk" for p in attentions.values())  # the default: q and k quantized
    assert all(names[id(q)] in fired for p in attentions.values() for q in p.act_quantizers())
    with torch.no_grad():
        out, ref = model(**rows)[0], fp(**rows)[0]
    error = ((out - ref).norm() / ref.norm()).item()
    assert 0 < error < 0.1, error  # W8A8: quantized, and close to the FP transformer

    # sampling with another scheduler and step count than the calibration's
    original = pipe.scheduler
    swap_scheduler(pipe)
    pipe.transformer = model
    try:
        extra = {k: v for k, v in kwargs.items() if k != "prompts"}
        prompt = {"prompt": PROMPTS[:1]} if "prompts" in kwargs else {"class_labels": [3]}
        images = pipe(**prompt, **extra, num_inference_steps=5, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.scheduler, pipe.transformer = original, fp
    assert images.shape[0] == 1 and torch.isfinite(images).all()

    qd.save(model, tmp_path / "q")
    restored = qd.load(tmp_path / "q", base=copy.deepcopy(fp))
    with torch.no_grad():
        assert torch.equal(restored(**rows)[0], out)


def test_flux_batchless_ids_are_recorded_once(collected, tmp_path):
    _, fp, calib = collected("flux")
    assert set(calib.constants) == {"img_ids", "txt_ids"} and calib.constants["img_ids"].shape == (16, 3)
    assert calib.ts.max() == 1.0 and not calib.timestep_is_int  # FLUX's timestep is t in [0, 1]
    loaded = qd.CalibrationSet.load(calib.save(tmp_path / "calib.safetensors"))
    assert loaded.digest() == calib.digest()
    with torch.no_grad():
        assert torch.equal(fp(**loaded.model_kwargs(slice(0, 2)))[0], fp(**calib.model_kwargs(slice(0, 2)))[0])
