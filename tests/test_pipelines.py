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
