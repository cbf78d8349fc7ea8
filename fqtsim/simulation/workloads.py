"""Layer shapes of models too big to train here, for the closed-form cost model.

Every layer is one GEMM per sample group: a conv layer is its im2col GEMM (the im2col matrix
built on chip from the feature map, see `fqtsim.hardware.conv`), a linear layer a GEMM with one row per
sample (or per token), attention's score and context products batched GEMMs.

    Layer(name, rows, k, n, repeat, weights, im2col, between, bias)
      rows     GEMM rows per sample (output positions Ho*Wo of a conv, tokens of a sequence)
      k, n     forward GEMM: (batch*rows x k) @ (k x n)
      repeat   independent GEMMs of that shape per sample (attention heads); 1 elsewhere
      weights  trainable parameters (0 for attention's activation x activation products)
      im2col   a conv layer's geometry for one sample (`fqtsim.hardware.conv.Im2col`); None elsewhere
      between  the ops between this GEMM's output and the next GEMM (`Op`s, or their kinds as
               strings): BatchNorm, ReLU, residual adds, pooling, softmax, ...; priced by
               `fqtsim.simulation.between`. Their tensor is the GEMM's output, (batch x repeat)
               samples of n channels at rows positions, until a pool changes its positions.
      bias     bias parameters (one per output feature; 0: none)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fqtsim.hardware.conv import Im2col

OPS = ("bn", "relu", "add", "maxpool", "avgpool", "softmax_ce", "layernorm", "softmax", "gelu")


@dataclass(frozen=True)
class Op:
    """One op between two GEMMs. `positions`, `window`: a pool's output positions per channel
    and elements per window (avgpool: 1 position, the whole map). `fork`: an add's (channels,
    positions) where its block's input forks, whose two gradients backward sums (None: the
    add's own shape). On a chain's last op: `quantized`, its output is the next GEMM's input
    (False: only a later add reads it); `kept`, a later residual add reads it too, so it is
    stored at full width whatever a quantizer does."""
    kind: str
    positions: int | None = None
    window: int | None = None
    fork: tuple | None = None
    quantized: bool = True
    kept: bool = False

    def __post_init__(self):
        if self.kind not in OPS:
            raise ValueError(f"between op: got {self.kind!r}; expected one of {', '.join(OPS)}")
        if self.kind == "maxpool" and (self.positions is None or self.window is None):
            raise ValueError("maxpool: needs its output positions and window")


@dataclass(frozen=True)
class Layer:
    name: str
    rows: int
    k: int
    n: int
    repeat: int = 1
    weights: int = 0
    im2col: Im2col | None = None
    between: tuple = ()
    bias: int = 0

    def __post_init__(self):   # kinds as plain strings are ops with no options
        object.__setattr__(self, "between", tuple(
            op if isinstance(op, Op) else Op(op) for op in self.between))


def conv(name: str, cin: int, cout: int, kernel: int, in_h: int, in_w: int | None = None,
         stride: int = 1, padding: int | None = None) -> Layer:
    """A convolution over a cin x in_h x in_w input; padding defaults to kernel // 2 ("same")."""
    win = Im2col(1, cin, in_h, in_h if in_w is None else in_w, kernel, stride,
                 kernel // 2 if padding is None else padding)
    return Layer(name, win.positions, win.cols, cout, weights=win.cols * cout, im2col=win)


def linear(name: str, fin: int, fout: int, rows: int = 1, between: tuple = ()) -> Layer:
    """A linear layer with a bias (as nn.Linear's default); convolutions here have none."""
    return Layer(name, rows, fin, fout, weights=fin * fout, between=between, bias=fout)


def _with(layer: Layer, *ops) -> Layer:
    return replace(layer, between=ops)


def resnet(depth: int, image: int = 224, classes: int = 1000) -> list[Layer]:
    """ResNet-18/34 (basic blocks) or ResNet-50/101/152 (bottlenecks) at `image` x `image`, with
    the ops between the convs: BN and ReLU after each, the stem's 3x3 stride-2 max pool, each
    block's residual add (after the downsample's BN where there is one, else after the last
    conv's BN), the average pool before fc and the softmax cross-entropy after it."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}
    if depth not in blocks:
        raise ValueError(f"resnet depth: got {depth}; expected one of {', '.join(map(str, blocks))}")
    bottleneck = depth >= 50
    stem = conv("conv1", 3, 64, 7, image, stride=2)
    size = image // 4                                   # conv1 stride 2, max pool 3x3 stride 2
    pooled, cin = size * size, 64
    plan = []    # per block: its convs, its downsample (or None), its input (channels, positions)
    for stage, (count, width) in enumerate(zip(blocks[depth], (64, 128, 256, 512)), start=1):
        cout = width * 4 if bottleneck else width
        for b in range(count):
            before = size
            stride = 2 if b == 0 and stage > 1 else 1   # the first block of a stage downsamples
            size //= stride
            name = f"layer{stage}.{b}"
            if bottleneck:                              # stride on the 3x3 conv (v1.5)
                convs = [conv(f"{name}.conv1", cin, width, 1, before),
                         conv(f"{name}.conv2", width, width, 3, before, stride=stride),
                         conv(f"{name}.conv3", width, cout, 1, size)]
            else:
                convs = [conv(f"{name}.conv1", cin, width, 3, before, stride=stride),
                         conv(f"{name}.conv2", width, width, 3, size)]
            down = (conv(f"{name}.downsample", cin, cout, 1, before, stride=stride)
                    if b == 0 and cin != cout else None)
            plan.append((convs, down, (cin, before * before)))
            cin = cout
    # a block's output is kept at full width where the next block adds it as its identity
    identity = [down is None for _, down, _ in plan[1:]] + [False]
    layers = [_with(stem, "bn", "relu", Op("maxpool", pooled, 9, kept=plan[0][1] is None))]
    for j, (convs, down, fork) in enumerate(plan):
        tail = (Op("avgpool", 1, size * size),) if j == len(plan) - 1 else ()
        out = (Op("relu", kept=identity[j]), *tail)
        layers += [_with(c, "bn", "relu") for c in convs[:-1]]
        if down is None:
            layers.append(_with(convs[-1], "bn", "add", *out))
        else:   # the last conv's BN output waits for the downsample's, which adds it
            layers += [_with(convs[-1], Op("bn", quantized=False, kept=True)),
                       _with(down, "bn", Op("add", fork=fork), *out)]
    layers.append(linear("fc", cin, classes, between=("softmax_ce",)))
    return layers


def transformer_block(seq: int = 512, width: int = 768, heads: int = 12) -> list[Layer]:
    """One pre-norm encoder block: QKV, attention scores and context per head, output projection,
    and a 4x MLP; between them softmax over the scores, the residual adds and LayerNorms, GELU.
    As a repeated unit the block ends with the next block's first LayerNorm (after fc2's add)."""
    if width % heads:
        raise ValueError(f"transformer: width {width} is not a multiple of heads {heads}")
    head = width // heads
    return [linear("qkv", width, 3 * width, seq),
            Layer("scores", seq, head, seq, repeat=heads,          # Q K^T per head
                  between=("softmax",)),
            Layer("context", seq, seq, head, repeat=heads),       # softmax(S) V per head
            linear("proj", width, width, seq, between=("add", "layernorm")),
            linear("mlp.fc1", width, 4 * width, seq, between=("gelu",)),
            linear("mlp.fc2", 4 * width, width, seq, between=("add", "layernorm"))]


def mlp(inputs: int = 64, classes: int = 10) -> list[Layer]:
    """The MLP that `fqtsim run` trains (see `fqtsim.training.models`)."""
    return [linear("1", inputs, 128, between=("relu",)), linear("3", 128, 64, between=("relu",)),
            linear("5", 64, classes, between=("softmax_ce",))]


def cnn(image: tuple = (1, 8, 8), classes: int = 10) -> list[Layer]:
    """The CNN that `fqtsim run` trains, at its dataset's image size."""
    c, h, w = image
    second = conv("3", 16, 32, 3, h, w, stride=2)
    return [_with(conv("0", c, 16, 3, h, w), "bn", "relu"), _with(second, "bn", "relu"),
            linear("7", 32 * second.im2col.positions, classes, between=("softmax_ce",))]


WORKLOADS = {"resnet18": lambda: resnet(18), "resnet50": lambda: resnet(50),
             "transformer": transformer_block, "mlp": mlp, "cnn": cnn}


def workload(name: str) -> list[Layer]:
    if name not in WORKLOADS:
        raise ValueError(f"model: got {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
