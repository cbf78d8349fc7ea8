"""The small models trained on the simulated device.

    mlp   Linear-ReLU-Linear-ReLU-Linear on flattened inputs (widths 128, 64)
    mlp6  the same six Linear layers deep (widths 128, 128, 128, 128, 64): where quantization
          noise accumulates through more layers
    cnn   two 3x3 convolutions (the second strided) with BatchNorm and ReLU, then a Linear
    cnn8  seven 3x3 convolutions with BatchNorm and ReLU (`workloads.CNN8`: widths 16 to 32,
          the 3rd, 5th and 7th strided), then a Linear: eight layers deep, for where
          quantization noise accumulates through depth in a network with BatchNorm
    gpt   a decoder-only transformer over characters (`fqtsim.training.gpt`), of the shape
          `workloads.GPTShape` gives, with its text's vocabulary and context

All but gpt take (C, H, W) images (the MLPs flatten them; the CNNs, `CONV_MODELS`, take them
as they are) and classify them; gpt takes token ids
and predicts each next token (`TASKS`). `convert` in `fqtsim.training.fqt` swaps their Linear and
Conv2d layers (and gpt's products of two activations and its embeddings) for FQT ones.
"""
from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "mlp6", "cnn", "cnn8", "gpt")
CONV_MODELS = ("cnn", "cnn8")   # take their samples as images, not flattened
TASKS = {"gpt": "lm"}   # what a model's dataset must ask of it (`data.task`); others: "classify"
MLP_DEPTHS = {"mlp": 3, "mlp6": 6}   # Linear layers


def mlp_widths(depth: int) -> list[int]:
    """The hidden widths of an MLP of `depth` Linear layers."""
    return [128] * (depth - 2) + [64]


def build(name: str, image_shape: tuple, classes: int) -> nn.Module:
    """Model `name` for samples of `image_shape` ((C, H, W); gpt: (tokens,)) and `classes`
    outputs (gpt: the vocabulary)."""
    if name == "gpt":
        from fqtsim.simulation.workloads import GPTShape
        from fqtsim.training.gpt import GPT
        return GPT(GPTShape(vocab=classes, context=image_shape[0]))
    c, h, w = image_shape
    if name in MLP_DEPTHS:
        widths = [c * h * w, *mlp_widths(MLP_DEPTHS[name])]
        hidden = [m for fin, fout in zip(widths, widths[1:])
                  for m in (nn.Linear(fin, fout), nn.ReLU())]
        return nn.Sequential(nn.Flatten(), *hidden, nn.Linear(widths[-1], classes))
    if name == "cnn":
        oh, ow = math.ceil(h / 2), math.ceil(w / 2)   # after the stride-2 conv (padding 1)
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * oh * ow, classes))
    if name == "cnn8":
        return cnn8(c, h, w, classes)
    raise ValueError(f"model: got {name!r}; expected one of {', '.join(MODELS)}")


def cnn8(c: int, h: int, w: int, classes: int) -> nn.Sequential:
    """`workloads.CNN8`'s convolutions (3x3, padding 1, no bias), each with BatchNorm and ReLU,
    then a Linear: module i*3 is conv i, as `workloads.cnn8` names them."""
    from fqtsim.simulation.workloads import CNN8
    modules, cin = [], c
    for cout, stride in CNN8:
        modules += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]
        h, w, cin = math.ceil(h / stride), math.ceil(w / stride), cout
    return nn.Sequential(*modules, nn.Flatten(), nn.Linear(cin * h * w, classes))
