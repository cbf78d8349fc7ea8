"""The small models trained on the simulated device.

    mlp   Linear-ReLU-Linear-ReLU-Linear on flattened inputs
    cnn   two 3x3 convolutions (the second strided) with BatchNorm and ReLU, then a Linear

Both take (C, H, W) images; the MLP flattens them. `convert` in `fqtsim.training.fqt` swaps their
Linear and Conv2d layers for FQT ones.
"""
from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "cnn")


def build(name: str, image_shape: tuple, classes: int) -> nn.Module:
    c, h, w = image_shape
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(),
                             nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, classes))
    if name == "cnn":
        oh, ow = math.ceil(h / 2), math.ceil(w / 2)   # after the stride-2 conv (padding 1)
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * oh * ow, classes))
    raise ValueError(f"model: got {name!r}; expected one of {', '.join(MODELS)}")
