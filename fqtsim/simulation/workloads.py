"""Layer shapes of models too big to train here, for the closed-form cost model.

Every layer is one GEMM per sample group: a conv layer is its im2col GEMM (the im2col matrix
built on chip from the feature map, see `fqtsim.hardware.conv`), a linear layer a GEMM with one row per
sample (or per token), attention's score and context products batched GEMMs.

    Layer(name, rows, k, n, repeat, weights, im2col)
      rows     GEMM rows per sample (output positions Ho*Wo of a conv, tokens of a sequence)
      k, n     forward GEMM: (batch*rows x k) @ (k x n)
      repeat   independent GEMMs of that shape per sample (attention heads); 1 elsewhere
      weights  trainable parameters (0 for attention's activation x activation products)
      im2col   a conv layer's geometry for one sample (`fqtsim.hardware.conv.Im2col`); None elsewhere
"""
from __future__ import annotations

from dataclasses import dataclass

from fqtsim.hardware.conv import Im2col


@dataclass(frozen=True)
class Layer:
    name: str
    rows: int
    k: int
    n: int
    repeat: int = 1
    weights: int = 0
    im2col: Im2col | None = None


def conv(name: str, cin: int, cout: int, kernel: int, in_h: int, in_w: int | None = None,
         stride: int = 1, padding: int | None = None) -> Layer:
    """A convolution over a cin x in_h x in_w input; padding defaults to kernel // 2 ("same")."""
    win = Im2col(1, cin, in_h, in_h if in_w is None else in_w, kernel, stride,
                 kernel // 2 if padding is None else padding)
    return Layer(name, win.positions, win.cols, cout, weights=win.cols * cout, im2col=win)


def linear(name: str, fin: int, fout: int, rows: int = 1) -> Layer:
    return Layer(name, rows, fin, fout, weights=fin * fout)


def resnet(depth: int, image: int = 224, classes: int = 1000) -> list[Layer]:
    """ResNet-18/34 (basic blocks) or ResNet-50/101/152 (bottlenecks) at `image` x `image`."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}
    if depth not in blocks:
        raise ValueError(f"resnet depth: got {depth}; expected one of {', '.join(map(str, blocks))}")
    bottleneck = depth >= 50
    layers = [conv("conv1", 3, 64, 7, image, stride=2)]
    size = image // 4                                   # conv1 stride 2, max pool 3x3 stride 2
    cin = 64
    for stage, (count, width) in enumerate(zip(blocks[depth], (64, 128, 256, 512)), start=1):
        cout = width * 4 if bottleneck else width
        for b in range(count):
            before = size
            stride = 2 if b == 0 and stage > 1 else 1   # the first block of a stage downsamples
            size //= stride
            name = f"layer{stage}.{b}"
            if bottleneck:                              # stride on the 3x3 conv (v1.5)
                layers += [conv(f"{name}.conv1", cin, width, 1, before),
                           conv(f"{name}.conv2", width, width, 3, before, stride=stride),
                           conv(f"{name}.conv3", width, cout, 1, size)]
            else:
                layers += [conv(f"{name}.conv1", cin, width, 3, before, stride=stride),
                           conv(f"{name}.conv2", width, width, 3, size)]
            if b == 0 and cin != cout:
                layers.append(conv(f"{name}.downsample", cin, cout, 1, before, stride=stride))
            cin = cout
    layers.append(linear("fc", cin, classes))
    return layers


def transformer_block(seq: int = 512, width: int = 768, heads: int = 12) -> list[Layer]:
    """One pre-norm encoder block: QKV, attention scores and context per head, output projection,
    and a 4x MLP. LayerNorm, softmax and GELU stay float."""
    if width % heads:
        raise ValueError(f"transformer: width {width} is not a multiple of heads {heads}")
    head = width // heads
    return [linear("qkv", width, 3 * width, seq),
            Layer("scores", seq, head, seq, repeat=heads),        # Q K^T per head
            Layer("context", seq, seq, head, repeat=heads),       # softmax(S) V per head
            linear("proj", width, width, seq),
            linear("mlp.fc1", width, 4 * width, seq),
            linear("mlp.fc2", 4 * width, width, seq)]


def mlp(inputs: int = 64, classes: int = 10) -> list[Layer]:
    """The MLP that `fqtsim run` trains (see `fqtsim.training.models`)."""
    return [linear("1", inputs, 128), linear("3", 128, 64), linear("5", 64, classes)]


def cnn(image: tuple = (1, 8, 8), classes: int = 10) -> list[Layer]:
    """The CNN that `fqtsim run` trains, at its dataset's image size."""
    c, h, w = image
    second = conv("3", 16, 32, 3, h, w, stride=2)
    return [conv("0", c, 16, 3, h, w), second,
            linear("7", 32 * second.im2col.positions, classes)]


WORKLOADS = {"resnet18": lambda: resnet(18), "resnet50": lambda: resnet(50),
             "transformer": transformer_block, "mlp": mlp, "cnn": cnn}


def workload(name: str) -> list[Layer]:
    if name not in WORKLOADS:
        raise ValueError(f"model: got {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
