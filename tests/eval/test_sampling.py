from __future__ import annotations

from types import SimpleNamespace

import pytest
import rank_jobs
import torch
from ranks import run_ranks

from questdiff.eval.sampling import class_labels, generate
from questdiff.zoo.architectures import build_class_embedder, build_cond_unet, build_scheduler, build_vae
from questdiff.zoo.pipelines import ClassConditionalLDMPipeline


@pytest.fixture(scope="module")
def pipe() -> ClassConditionalLDMPipeline:
    torch.manual_seed(0)
    pipe = ClassConditionalLDMPipeline(
        vae=build_vae(tiny=True), unet=build_cond_unet(tiny=True), class_embedder=build_class_embedder(tiny=True),
        scheduler=build_scheduler("ldm"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])  # eta 1 draws fresh noise at every step: per-sample generators too
def test_sample_i_does_not_depend_on_the_batch_size(pipe, eta: float) -> None:
    a = generate(pipe, 7, seed=3, batch_size=3, num_inference_steps=3, eta=eta)
    b = generate(pipe, 7, seed=3, batch_size=7, num_inference_steps=3, eta=eta)
    assert a.shape == (7, 1, 32, 32) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_two_ranks_sample_the_one_process_images() -> None:
    # 5 images in batches of 2: rank 0 samples images 0-1, rank 1 images 2-4 (batches [2, 3] and [4])
    settings = {"num_images": 5, "seed": 3, "batch_size": 2, "num_inference_steps": 3}
    alone = rank_jobs.sample(**settings)
    ranks = run_ranks(rank_jobs.sample, **settings)
    assert [r["rows_run"] for r in ranks] == [2 * 3, 3 * 3] and alone["rows_run"] == 5 * 3  # the work was split
    for result in ranks:
        assert torch.equal(result["images"], alone["images"])  # every rank returns all images, bit for bit


def test_class_labels_cycle_through_the_classes(pipe) -> None:
    assert class_labels(pipe, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert class_labels(lambda batch_size=1: None, 12) is None  # unconditional


def test_text_pipelines_get_cycled_prompts_and_one_generator_per_sample() -> None:
    calls = []

    class TextPipeline:
        def __call__(self, prompt, generator=None, output_type="pil", num_inference_steps=50):
            calls.append((prompt, [g.initial_seed() for g in generator], num_inference_steps))
            return SimpleNamespace(images=torch.zeros(len(prompt), 3, 8, 8))

    images = generate(TextPipeline(), 5, seed=10, batch_size=2, num_inference_steps=4, prompts=["a", "b", "c"])
    assert images.shape == (5, 3, 8, 8)
    assert calls == [(["a", "b"], [10, 11], 4), (["c", "a"], [12, 13], 4), (["b"], [14], 4)]


def test_bad_counts_raise(pipe) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        generate(pipe, 0)


def test_progress_bar_moves_every_sampler_step(pipe, monkeypatch) -> None:
    from questdiff.eval import sampling

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.n, self.updates = 0, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n
            self.updates.append(n)

    bars: list[Bar] = []
    monkeypatch.setattr(sampling, "tqdm", Bar)
    generate(pipe, 4, batch_size=2, num_inference_steps=3)
    bar, = bars
    assert len(bar.updates) >= 6 and bar.n == pytest.approx(4)  # 2 batches x 3 steps, not 2 batch ticks
