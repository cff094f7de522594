"""Inception-v3 FID and CLIP score paths, on randomly initialised networks of the real shapes saved to tmp_path."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from questdiff.eval import standard


def _pytorch_fid_or_skip():
    try:
        return standard._pytorch_fid()
    except ImportError as err:
        pytest.skip(f"Inception-v3 FID path untested here: {err}")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    _pytorch_fid_or_skip()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / standard.INCEPTION_FILE
    torch.save(standard.fid_inception_v3(None).state_dict(), path)
    return path


def test_local_weights_give_pytorch_fids_own_network(inception_file) -> None:
    inception = _pytorch_fid_or_skip()
    state = torch.load(inception_file, weights_only=True)
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state) as download:
        reference = inception.InceptionV3([3]).eval()  # the official construction, its download faked
    download.assert_called_once()
    ours = standard.InceptionPool3(inception_file)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)[0].flatten(1).double()
        torch.testing.assert_close(ours(images), expected)
        grey = images[:, :1]
        torch.testing.assert_close(ours(grey), reference(grey.expand(-1, 3, -1, -1))[0].flatten(1).double())


def test_inception_fid_is_zero_against_itself(inception_file, images) -> None:
    a, b = images[:4], images[4:8]
    scores = standard.inception_fid({"same": a, "other": b}, a, inception_file, batch_size=3)
    assert abs(scores["same"]) < 1e-3 * scores["other"]


def test_inception_weights_errors_name_the_file(tmp_path) -> None:
    _pytorch_fid_or_skip()
    with pytest.raises(FileNotFoundError, match=standard.INCEPTION_FILE):
        standard.fid_inception_v3(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        standard.fid_inception_v3(bad)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="CLIP score needs transformers (questdiff[text])")
    folder = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=52, eos_token_id=53,
                         pad_token_id=53),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_mean_cosine(clip_dir, images) -> None:
    from transformers import CLIPModel, CLIPProcessor

    captions = ["a shoe", "a bag", "a shirt", "a dress"]
    score = standard.clip_score(images[:4], captions, clip_dir, batch_size=3)
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    uint8 = images[:4].mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    inputs = processor(text=captions, images=list(uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both unit-normalised by CLIPModel
    assert score == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-3)


def test_clip_errors_name_the_fix(tmp_path, images) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        standard.clip_score(images[:2], ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match="one caption per image"):
        standard.clip_score(images[:2], ["a"], tmp_path)


class _RandomPool3(torch.nn.Module):
    """A small random network with pytorch-fid ``InceptionV3``'s interface: ``[N, 3, H, W]`` -> ``[[N, 2048, 1, 1]]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, standard.INCEPTION_DIM, 1), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(2 * x - 1)]


def test_inception_fid_path_on_a_random_network(images) -> None:
    """The FID path below pytorch-fid's network (runs everywhere; the network itself is tested above when
    pytorch-fid is installed)."""
    from questdiff.eval.generative import _Precomputed
    from torchmetrics.image.fid import FrechetInceptionDistance

    network = _RandomPool3()
    pool3 = standard.InceptionPool3(None, network=network)
    a, b = images[:6], images[6:12]
    with torch.no_grad():  # grey images are repeated to 3 channels; features are [N, 2048] float64
        features = pool3(a)
        torch.testing.assert_close(features, network(a.expand(-1, 3, -1, -1))[0].flatten(1).double())
        fb = pool3(b)
    assert features.shape == (6, standard.INCEPTION_DIM) and features.dtype == torch.float64
    # batches of 4 over 6 images, "other" after "same" (the reset must keep the reference statistics): the same
    # value as torchmetrics on the features in one batch
    scores = standard.inception_fid({"same": a, "other": b}, a, pool3, batch_size=4)
    metric = FrechetInceptionDistance(feature=_Precomputed(standard.INCEPTION_DIM))
    metric.update(features, real=True)
    metric.update(fb, real=False)
    assert scores["other"] == pytest.approx(float(metric.compute()), rel=1e-5) and scores["other"] > 0
    assert abs(scores["same"]) < 1e-3 * scores["other"]
    with pytest.raises(ValueError, match="unsqueeze"):
        standard.inception_fid({"bad": a[:, 0]}, a, pool3)
