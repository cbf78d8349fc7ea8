"""Layer shapes of models too big to train here, for the closed-form cost model.

Every layer is one GEMM per sample group: a conv layer is its im2col GEMM (the im2col matrix
built on chip from the feature map, see `fqtsim.hardware.conv`), a linear layer a GEMM with one row per
sample (or per token), attention's score and context products batched GEMMs.

    Layer(name, rows, k, n, repeat, weights, im2col, between, bias, per_sample, sample_rows,
          b_source, kind)
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
      per_sample  the GEMM runs once per sample and repeat, (rows x k) @ (k x n), its B operand
               the sample's own activation (attention's Q K^T and P V per sequence and head)
      sample_rows  rows of dY that a per-sample gradient quantizer (PSQ, BHQ) ranges together
               (None: `rows`, a whole sample, as a conv's positions; 1: each token row alone)
      b_source a weightless layer's B operand: the layer whose output it is, quantized on the
               device from that output (8-bit, per tensor), as the A operand is
      kind     "gemm"; or "embedding": a token and position lookup (k tokens, rows positions, n
               wide) with no GEMM, priced by `fqtsim.simulation.embedding`
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fqtsim.hardware.conv import Im2col

OPS = ("bn", "relu", "add", "maxpool", "avgpool", "softmax_ce", "layernorm", "softmax", "gelu")
KINDS = ("gemm", "embedding")


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
    per_sample: bool = False
    sample_rows: int | None = None
    b_source: str | None = None
    kind: str = "gemm"

    def __post_init__(self):   # kinds as plain strings are ops with no options
        object.__setattr__(self, "between", tuple(
            op if isinstance(op, Op) else Op(op) for op in self.between))
        if self.kind not in KINDS:
            raise ValueError(f"layer kind: got {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.b_source is not None and self.weights:
            raise ValueError(f"{self.name}: a B operand from {self.b_source!r} has no weights")

    @property
    def group_rows(self) -> int:
        """Rows of dY per group of a per-sample gradient quantizer (`sample_rows`)."""
        return self.rows if self.sample_rows is None else self.sample_rows

    def gemms(self, batch: int) -> tuple[int, int]:
        """(M, times): the forward GEMM's rows and how many such GEMMs a step of `batch` samples
        runs (per sample and repeat for a per-sample layer, else per repeat)."""
        if self.per_sample:
            return self.rows, batch * self.repeat
        return batch * self.rows, self.repeat


def conv(name: str, cin: int, cout: int, kernel: int, in_h: int, in_w: int | None = None,
         stride: int = 1, padding: int | None = None) -> Layer:
    """A convolution over a cin x in_h x in_w input; padding defaults to kernel // 2 ("same")."""
    win = Im2col(1, cin, in_h, in_h if in_w is None else in_w, kernel, stride,
                 kernel // 2 if padding is None else padding)
    return Layer(name, win.positions, win.cols, cout, weights=win.cols * cout, im2col=win)


def linear(name: str, fin: int, fout: int, rows: int = 1, between: tuple = (),
           tokens: bool = False, bias: bool = True) -> Layer:
    """A linear layer, with a bias by default (as nn.Linear's); convolutions here have none.
    `tokens`: its rows are a sequence's tokens, each a group of its own for PSQ and BHQ."""
    return Layer(name, rows, fin, fout, weights=fin * fout, between=between,
                 bias=fout if bias else 0, sample_rows=1 if tokens else None)


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
    """One pre-norm block: QKV, attention scores and context per sequence and head, output
    projection, and a 4x MLP; between them softmax over the scores, the residual adds and
    LayerNorms, GELU. As a repeated unit the block ends with the next block's first LayerNorm
    (after fc2's add)."""
    return _block("", seq, width, heads)


def _block(prefix: str, seq: int, width: int, heads: int) -> list[Layer]:
    """A block's layers named `prefix` + qkv, scores, context, proj, mlp.fc1, mlp.fc2; every row
    a token (PSQ and BHQ range each token row alone), Q K^T and P V one GEMM per sequence and
    head whose B operand (K^T, V) the device quantizes from qkv's output."""
    if width % heads:
        raise ValueError(f"transformer: width {width} is not a multiple of heads {heads}")
    head = width // heads
    qkv = f"{prefix}qkv"
    attention = dict(repeat=heads, per_sample=True, sample_rows=1, b_source=qkv)
    return [linear(qkv, width, 3 * width, seq, tokens=True),
            Layer(f"{prefix}scores", seq, head, seq, between=("softmax",), **attention),  # Q K^T
            Layer(f"{prefix}context", seq, seq, head, **attention),                     # P V
            linear(f"{prefix}proj", width, width, seq, between=("add", "layernorm"), tokens=True),
            linear(f"{prefix}mlp.fc1", width, 4 * width, seq, between=("gelu",), tokens=True),
            linear(f"{prefix}mlp.fc2", 4 * width, width, seq, between=("add", "layernorm"),
                   tokens=True)]


def embedding(name: str, vocab: int, context: int, width: int, tied: bool = False) -> Layer:
    """Token and position embeddings: a lookup of each token's row, plus its position's (the
    add), then the first block's LayerNorm. `tied`: the token table is the head's weight (its
    update is the head's), so this layer trains the positions only."""
    tables = context if tied else vocab + context
    return Layer(name, context, vocab, width, weights=tables * width, sample_rows=1,
                 between=("add", "layernorm"), kind="embedding")


@dataclass(frozen=True)
class GPTShape:
    """A decoder-only transformer's shape; the defaults are the model `fqtsim run --model gpt`
    trains (`fqtsim.training.gpt`), with the vocabulary of its corpus."""
    vocab: int = 96
    context: int = 64
    width: int = 64     # small enough that a grid of FQT runs fits in half an hour on 2 cores
    heads: int = 4
    blocks: int = 2

    def __post_init__(self):
        for field, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gpt {field}: got {value!r}; expected an integer >= 1")
        if self.width % self.heads:
            raise ValueError(f"gpt: width {self.width} is not a multiple of heads {self.heads}")


GPT2 = GPTShape(vocab=50257, context=1024, width=768, heads=12, blocks=12)


def gpt(shape: GPTShape = GPTShape(), tied: bool = False) -> list[Layer]:
    """A decoder-only transformer, layer names as `fqtsim.training.gpt` names its modules:
    embeddings, `blocks` pre-norm blocks (h.0. ...), the final LayerNorm (the last fc2's chain)
    and the head over the vocabulary (no bias) with the softmax cross-entropy at every
    position."""
    layers = [embedding("embed", shape.vocab, shape.context, shape.width, tied)]
    for i in range(shape.blocks):
        layers += _block(f"h.{i}.", shape.context, shape.width, shape.heads)
    return layers + [linear("head", shape.width, shape.vocab, shape.context,
                            between=("softmax_ce",), tokens=True, bias=False)]


def gpt2() -> list[Layer]:
    """GPT-2 small: 12 blocks of width 768 with 12 heads over 1024 tokens, a 50,257-token
    vocabulary, the head tied to the token table: 124.4M parameters, LayerNorms' aside."""
    return gpt(GPT2, tied=True)


def mlp(inputs: int = 64, classes: int = 10, hidden: tuple = (128, 64)) -> list[Layer]:
    """An MLP that `fqtsim run` trains (see `fqtsim.training.models`; `hidden`: its widths),
    its Linear layers named as its nn.Sequential names them: 1, 3, 5, ... (after a Flatten,
    every other module is a ReLU)."""
    widths = [inputs, *hidden, classes]
    return [linear(str(2 * i + 1), fin, fout,
                   between=("relu",) if i < len(hidden) else ("softmax_ce",))
            for i, (fin, fout) in enumerate(zip(widths, widths[1:]))]


def cnn(image: tuple = (1, 8, 8), classes: int = 10) -> list[Layer]:
    """The CNN that `fqtsim run` trains, at its dataset's image size."""
    c, h, w = image
    second = conv("3", 16, 32, 3, h, w, stride=2)
    return [_with(conv("0", c, 16, 3, h, w), "bn", "relu"), _with(second, "bn", "relu"),
            linear("7", 32 * second.im2col.positions, classes, between=("softmax_ce",))]


CNN8 = ((16, 1), (16, 1), (16, 2), (32, 1), (32, 2), (32, 1), (32, 2))   # (channels, stride)


def cnn8(image: tuple = (1, 8, 8), classes: int = 10) -> list[Layer]:
    """The eight-layer CNN that `fqtsim run --model cnn8` trains, at its dataset's image size:
    `CNN8`'s 3x3 convolutions, each with BN and ReLU (modules 0, 3, 6, ...), then the Linear
    after the Flatten."""
    c, h, w = image
    layers = []
    for i, (cout, stride) in enumerate(CNN8):
        layer = conv(str(3 * i), c, cout, 3, h, w, stride=stride)
        layers.append(_with(layer, "bn", "relu"))
        c, h, w = cout, layer.im2col.out_h, layer.im2col.out_w
    return layers + [linear(str(3 * len(CNN8) + 1), c * h * w, classes, between=("softmax_ce",))]


WORKLOADS = {"resnet18": lambda: resnet(18), "resnet50": lambda: resnet(50),
             "transformer": transformer_block, "gpt": gpt, "gpt2": gpt2, "mlp": mlp, "cnn": cnn,
             "cnn8": cnn8}


def workload(name: str) -> list[Layer]:
    if name not in WORKLOADS:
        raise ValueError(f"model: got {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
