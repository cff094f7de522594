"""``--model`` resolution: a zoo pipeline folder given as a path loads its shared components too."""
import pytest
import torch

from questdiff import zoo
from questdiff.loading import load_pipeline
from questdiff.zoo.registry import is_shipped, shared_components


def test_zoo_folder_with_a_shared_component_loads_as_a_path():
    if not is_shipped("fmnist-ldm"):
        pytest.skip("fmnist-ldm is not shipped")
    folder = zoo.weights_dir("fmnist-ldm")
    assert "vae" in shared_components(folder)
    pipe, name = load_pipeline(str(folder))
    assert name == "fmnist-ldm" and pipe.vae.dtype == torch.float32
    for a, b in zip(pipe.vae.state_dict().values(), zoo.load("fmnist-ldm").vae.state_dict().values()):
        assert torch.equal(a, b)
