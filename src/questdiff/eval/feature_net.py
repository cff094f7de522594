"""The project's stand-in for Inception-v3: a small classifier whose features drive FID/sFID/IS/KID.

No Inception weights can be downloaded here, so metrics computed with this network are reported as
"FID (FMNIST features)" / "FID (MNIST features)", never as plain FID.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
POOL_DIM = 256
SPATIAL_CHANNELS = 32  # first channels of the 8x8 map, like ADM's sFID uses the first 7 channels of mixed_6/conv
SPATIAL_DIM = SPATIAL_CHANNELS * 8 * 8


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
    )


class FeatureNet(nn.Module):
    """CNN classifier for 1x32x32 grey images in [0, 1].

    Shapes: input ``[N, 1, 32, 32]``; ``features`` returns
    ``pool [N, 256]`` (FID/KID), ``spatial [N, 2048]`` (sFID), ``logits [N, 10]`` (IS, class accuracy).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _block(1, 32, 1)       # 32x32
        self.down1 = _block(32, 64, 2)     # 16x16
        self.down2 = _block(64, 128, 2)    # 8x8  -> spatial features
        self.down3 = _block(128, POOL_DIM, 2)  # 4x4 -> pooled features
        self.head = nn.Linear(POOL_DIM, num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"FeatureNet expects grey images of shape [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], got {tuple(x.shape)}; "
                "resize/pad the images to 32x32 and keep one channel"
            )
        return (x - 0.5) / 0.5  # network works in [-1, 1]

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.down2(self.down1(self.stem(self._check(x))))
        spatial = h[:, :SPATIAL_CHANNELS].flatten(1)
        pool = F.adaptive_avg_pool2d(self.down3(h), 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.features(x)["logits"]
