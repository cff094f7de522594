"""``pipelines.step_progress``: sampling and calibration bars move at every sampler step, not once per batch."""
from __future__ import annotations

import pytest

from questdiff.pipelines import step_progress

from builders import ddim_pipeline


class Bar:
    def __init__(self):
        self.n, self.history = 0, []

    def update(self, n=1):
        self.n += n
        self.history.append(self.n)


@pytest.mark.parametrize("steps", [4, 7])
def test_bar_advances_every_step_and_ends_on_the_image_count(steps):
    pipe = ddim_pipeline()
    pipe.set_progress_bar_config(disable=True)
    bar = Bar()
    with step_progress(pipe, bar, 3):
        pipe(batch_size=3, num_inference_steps=steps, output_type="np")
    with step_progress(pipe, bar, 2):
        pipe(batch_size=2, num_inference_steps=steps, output_type="np")
    moves = bar.history
    assert len(moves) >= 2 * steps  # one move per denoiser call
    assert moves[steps - 1] == pytest.approx(3) and bar.n == pytest.approx(5)
    assert moves[0] == pytest.approx(3 / steps)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm", "plms", "euler"])
def test_the_full_chain_fits_a_schedule_with_steps_offset(name):
    """Issue 20 item 6: with the LDM setting ``steps_offset=1``, 1000 steps of 1000 trained timesteps ran timestep
    1000 (an IndexError); ``fit_scheduler`` lowers the offset for that count only, so the chain runs 999..0, and
    every other step count keeps the configured timesteps."""
    import copy
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from questdiff.pipelines import fit_scheduler, set_scheduler

    pipe = SimpleNamespace(scheduler=DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False))
    set_scheduler(pipe, name)
    for steps in (20, 999):
        configured = copy.deepcopy(pipe.scheduler)
        configured.set_timesteps(steps)
        fit_scheduler(pipe, steps)
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.timesteps.tolist() == configured.timesteps.tolist()
    fit_scheduler(pipe, 1000)
    pipe.scheduler.set_timesteps(1000)
    assert int(pipe.scheduler.timesteps.max()) == 999 and int(pipe.scheduler.timesteps.min()) == 0
