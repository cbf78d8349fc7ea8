"""The ops between the GEMMs, in closed form: BatchNorm, ReLU, residual adds, pooling, softmax
with cross-entropy, and a transformer's softmax, LayerNorm and GELU, forward and backward, as raw
events {(event, level): [count, bytes, cycles]} for `fqtsim.simulation.ledger.price`, which
prices their ops from the config's vector table (ops per element in `ledger.PASS_OPS`) and their
traffic from its memories.

A tensor is (samples, channels, positions per sample) (`Shape`); after a GEMM it is the GEMM's
output, (batch x repeat, n, rows). It is stored at `bits` (the config's wide width,
`fqtsim.hardware.mapping.wide_store_bits`, or 8-bit codes) at a memory level, "tcm" or "ddr".
Each function charges the work its op does: its reads, its ops, its side writes (masks,
indices); never the write of its input, which is its producer's (a GEMM's write-back, or the
pass before). "A pass" streams a tensor from its level through the vector unit; its output is
written once (`write`, pass_write) at the size the pass leaves. Ops that ride a pass (ReLU, an
add, a pool after BN) or a GEMM's output pipeline (level "array") read no copy of the tensor and
write none.

Schedules (N elements, C channels):
  BN forward     the batch statistics come first: per-channel sum and sum of squares
                 (norm_stats: 2 add + 1 mul per element) by adders beside the producer's write
                 where the config fuses ranges (`pipeline.range: fused`, level "array": no read),
                 else by a pass that reads y; per channel the mean, variance, 1/sqrt (3 Newton
                 steps), scale, shift and running statistics (bn_channel: 18 mul + 11 add); then
                 one pass reads y, y * scale + shift (bn_norm: 1 mul + 1 add), its riders, writes.
  BN backward    y is kept for it (an 8-bit y's scale and offset fold into the per-channel
                 constants); a reduction pass reads dy and y and sums dy and dy * y per channel
                 (bn_grad_sums: 1 mul + 2 add; sum dy x_hat = rstd (sum dy y - mean sum dy)); per
                 channel a, b, c (bn_grad_channel: 8 mul + 2 add); a pass reads dy and y again
                 and writes dx = a dy + b y + c (bn_grad: 2 mul + 2 add).
  ReLU           rides the pass before it, or the GEMM's output pipeline when it follows the
                 GEMM: max(x, 0), one compare; its mask is written at 1 bit per element
                 (relu_mask): exact, where codes of the output are not (a small x codes to 0).
                 Backward: rides what writes the gradient reaching it (the output pipeline of the
                 GEMM above, or an unpool pass): reads the mask, selects (relu_grad).
  residual add   rides a pass or the GEMM's output pipeline: reads the other operand, one add.
                 Backward: the gradient fans out (no op); where the block's input forked its two
                 gradients meet, and the output pipeline of the GEMM writing the second adds the
                 first: one read of the fork's shape, one add per element (residual_grad).
  max pool       rides the pass before it on line buffers: window - 1 compares per output
                 (maxpool, count: compares) and the argmax written at ceil(log2(window)) bits
                 (pool_index). Backward: a pass reads the pooled gradient and the indices, adds
                 each into its argmax (windows overlap: maxpool_grad, one add per output) and
                 writes the unpooled gradient.
  average pool   rides the pass before it: one add per input element (1/window folds into the
                 next quantizer's per-tensor scale). Backward: a pass reads the pooled gradient,
                 dy / window per output (avgpool_grad) and writes it broadcast.
  softmax + CE   the logits' row max beside the fc GEMM's write (or a pass: softmax_max); a pass
                 reads the logits for exp(x - max) and the row sums (softmax: 4 mul + 7 add; exp
                 as 2^int times a degree-3 polynomial of the fraction); per row 1 / sum (3 Newton
                 steps, softmax_row: 6 mul + 4 add) and the loss log(sum) + max - x_label (a
                 degree-4 polynomial; ce_row: 6 mul + 9 add, with the gradient's 1/batch and -1
                 at the label). Backward (the loss gradient): a pass reads the logits again,
                 recomputes exp, times 1 / (batch sum) (softmax_out: 5 mul + 6 add) and writes
                 dlogits: rereading the logits moves fewer bytes than writing the exps and
                 reading them back.
  softmax        over each row of attention scores: as above without the loss, and a second pass
                 reads the scores and writes P (softmax_out; 1/sqrt(d) folds into exp's scale).
                 Backward: P is kept as the 8-bit codes the context GEMM read; a reduction pass
                 reads dP and P for sum(dP P) per row (softmax_grad_sums), a pass reads both again
                 and writes dS = P (dP - sum) (softmax_grad: 1 mul + 1 add each).
  LayerNorm      as BN with statistics per token over its channels (norm_stats; ln_row: 13 mul +
                 6 add) and a pass (x - mean) rstd gamma + beta (ln_norm: 2 mul + 2 add);
                 backward a reduction pass with dgamma and dbeta (ln_grad_sums: 4 mul + 5 add),
                 per-token means (ln_grad_row: 2 mul) and a pass writing dx (ln_grad: 4 mul +
                 3 add).
  GELU           x sigmoid(1.702 x) in the GEMM's output pipeline (gelu: 9 mul + 9 add: exp and a
                 reciprocal by 2 Newton steps), which also writes its input, kept for backward;
                 backward rides the output pipeline of the GEMM above: reads that input and
                 multiplies dy by the derivative (gelu_grad: 12 mul + 11 add).
A layer's chain (`Layer.between`) runs as few passes as these allow (`forward`, `backward`): an
owner (BN, LayerNorm, softmax, softmax + CE; a pool with no pass before it; a pool's backward)
starts a pass, and the ops after it ride it.

Where tensors live: a callable where(nbytes, kept) -> "tcm" | "ddr"; kept means read again after
another GEMM has run (BN's y, masks and indices saved for backward, a residual's other operand,
a gradient both branches of a fork read). The default (`placement`): TCM if it is not kept and
fits `hw.tcm.size_bytes` less a reservation, else DDR (a GEMM's tiles take the TCM between).

Sharing with a quantizer (`pair`): a chain whose last pass writes a GEMM's operand (the next
layer's input, or a layer's output gradient) writes the tensor that the operand's quantizer
takes wide (`schedule.input_events`). Without sharing that is the one write (the pass's
write, charged as the quantizer's wide_write; a tensor kept wide for a residual add stays the
chain's) and the quantizer ranges and requantizes it as any other. With
sharing, the cheapest of those that apply:
  exact      a range that contains the output is known before the pass writes it: BN then ops
             monotone per channel (ReLU, pools), whose per-channel min/max of y, gathered with
             BN's statistics, give ReLU(BN(y))'s exactly (after a pool its max exactly, its min
             a bound); softmax's P, within [0, 1 / min row sum]. The pass writes the codes: no
             wide write, no range read, no requantization read (the quantizer's ops remain).
  store      the range is tracked as the pass writes the wide tensor: no range read; the
             requantization read remains (the usual case backward: BN's dx is not monotone in
             any one stored tensor, so its range is known only once it is computed).
  recompute  the last pass runs twice, first for the range (writing nothing), then writing the
             codes: its inputs are read again instead of the wide tensor written and read back.
             Not for BHQ (its transform needs the wide tensor), nor an output kept wide anyway.
A delayed-range quantizer requantizes where its tensor is produced, shared or not: the pass
writes the codes. An output kept for a residual add is written wide in every variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from fqtsim.hardware.hw import HWConfig
from fqtsim.hardware.mapping import Producer, by_columns, nbytes, wide_store_bits
from fqtsim.simulation.ledger import GemmSpec, add, merge, pass_memory_cycles, price
from fqtsim.simulation.schedule import (FORWARD_BITS, GRAD_WEIGHT_BITS, QuantScheme,
                                        activation_scheme, input_events, range_level,
                                        unpredicted, weight_gradient_method)
from fqtsim.simulation.workloads import Layer, Op

MEMORY = ("tcm", "ddr")
MASK_BITS = 1


class Shape(NamedTuple):
    """(samples, channels, positions per sample); BN reduces per channel, LayerNorm and softmax
    per row (a sample's position, over its channels)."""
    samples: int
    channels: int
    positions: int = 1

    @property
    def elements(self) -> int:
        return self.samples * self.channels * self.positions

    @property
    def rows(self) -> int:
        return self.samples * self.positions

    def pooled(self, positions: int) -> Shape:
        return Shape(self.samples, self.channels, positions)


def _ops(events, event, at, count):
    add(events, event, at, count)


def _read(events, event, level, elements, bits):
    add(events, event, level, elements, nbytes(elements, bits))


def _stats(events, event, at, level, elements, bits):
    """A reduction beside the producer's write (array), or a pass that reads the tensor."""
    _ops(events, event, at, elements)
    if at == "vector":
        _read(events, event, level, elements, bits)


def _reduce_then_map(events, passes, n, grad_bits, level, saved_bits, saved_level):
    """A norm's backward: a reduction pass, then an elementwise one, each reading the
    gradient and the saved forward tensor."""
    for event in passes:
        _ops(events, event, "vector", n)
        _read(events, event, level, n, grad_bits)
        _read(events, event, saved_level, n, saved_bits)


def _reading(event, at, n, level, bits) -> dict:
    """An op on `n` elements (at the vector unit or in a pipeline) that reads one tensor."""
    events = {}
    _ops(events, event, at, n)
    _read(events, event, level, n, bits)
    return events


def index_bits(window: int) -> int:
    """Bits of an argmax within a window."""
    return max(1, math.ceil(math.log2(window)))


def write(elements: int, bits: int, level: str) -> dict:
    """A pass's output written at its stored width."""
    return {("pass_write", level): [elements, nbytes(elements, bits), 0.0]}


# --- one op, forward and backward --------------------------------------------------------------

def bn_forward(hw: HWConfig, shape: Shape, bits: int, level: str, *,
               stats_at: str | None = None) -> dict:
    """BN in training on y at `level`: statistics (`stats_at`: "array" beside the producer's
    write, "vector" by a read pass; default as the config fuses ranges), then the normalize pass
    (its write is the chain's)."""
    return _norm_forward(hw, shape, bits, level, stats_at, ("bn_channel", shape.channels),
                         "bn_norm")


def bn_backward(hw: HWConfig, shape: Shape, grad_bits: int, level: str, *, saved_bits: int,
                saved_level: str) -> dict:
    """BN backward: reduction pass, per-channel coefficients, then the pass writing dx (the
    chain's write); dy at `level`, y kept at `saved_level`."""
    return _norm_backward(shape, grad_bits, level, saved_bits, saved_level,
                          ("bn_grad_sums", "bn_grad"), ("bn_grad_channel", shape.channels))


def layernorm_forward(hw: HWConfig, shape: Shape, bits: int, level: str, *,
                      stats_at: str | None = None) -> dict:
    """LayerNorm: as BN with its statistics per row (token) over the channels."""
    return _norm_forward(hw, shape, bits, level, stats_at, ("ln_row", shape.rows), "ln_norm")


def layernorm_backward(hw: HWConfig, shape: Shape, grad_bits: int, level: str, *, saved_bits: int,
                       saved_level: str) -> dict:
    return _norm_backward(shape, grad_bits, level, saved_bits, saved_level,
                          ("ln_grad_sums", "ln_grad"), ("ln_grad_row", shape.rows))


def _norm_forward(hw, shape, bits, level, stats_at, per_group, normalize) -> dict:
    """Statistics, then per group (`per_group`: its event and count) the constants, then the
    pass that normalizes."""
    events, n = {}, shape.elements
    _stats(events, "norm_stats", stats_at or range_level(hw), level, n, bits)
    _ops(events, per_group[0], "vector", per_group[1])
    _ops(events, normalize, "vector", n)
    _read(events, normalize, level, n, bits)
    return events


def _norm_backward(shape, grad_bits, level, saved_bits, saved_level, passes, per_group) -> dict:
    """A reduction pass, the per-group coefficients, then the elementwise pass writing dx."""
    events = {}
    _reduce_then_map(events, passes, shape.elements, grad_bits, level, saved_bits, saved_level)
    _ops(events, per_group[0], "vector", per_group[1])
    return events


def relu_forward(hw: HWConfig, shape: Shape, mask_level: str, *, at: str = "vector") -> dict:
    """ReLU riding a pass (vector) or a GEMM's output pipeline (array); its mask saved."""
    events, n = {}, shape.elements
    _ops(events, "relu", at, n)
    add(events, "relu_mask", mask_level, n, nbytes(n, MASK_BITS))
    return events


def relu_backward(hw: HWConfig, shape: Shape, mask_level: str, *, at: str = "array") -> dict:
    return _reading("relu_grad", at, shape.elements, mask_level, MASK_BITS)


def add_forward(hw: HWConfig, shape: Shape, bits: int, level: str, *, at: str = "vector") -> dict:
    """A residual add riding a pass or a GEMM's output pipeline: reads the other operand."""
    return _reading("residual_add", at, shape.elements, level, bits)


def add_backward(hw: HWConfig, fork: Shape, grad_bits: int, level: str, *,
                 at: str = "array") -> dict:
    """The fork's two gradients summed where the second is written: read the first, add."""
    return _reading("residual_grad", at, fork.elements, level, grad_bits)


def maxpool_forward(hw: HWConfig, shape: Shape, positions: int, window: int, index_level: str, *,
                    level: str | None = None, bits: int = 0) -> dict:
    """Max pool riding a pass (level None), or a pass of its own reading `shape` at `level`."""
    events, outputs = {}, shape.pooled(positions).elements
    _ops(events, "maxpool", "vector", outputs * (window - 1))
    if level is not None:
        _read(events, "maxpool", level, shape.elements, bits)
    add(events, "pool_index", index_level, outputs, nbytes(outputs, index_bits(window)))
    return events


def maxpool_backward(hw: HWConfig, shape: Shape, positions: int, window: int, grad_bits: int,
                     level: str, index_level: str) -> dict:
    """The scatter pass: reads the pooled gradient and its indices (the chain writes dx)."""
    events, outputs = {}, shape.pooled(positions).elements
    _ops(events, "maxpool_grad", "vector", outputs)
    _read(events, "maxpool_grad", level, outputs, grad_bits)
    _read(events, "maxpool_grad", index_level, outputs, index_bits(window))
    return events


def avgpool_forward(hw: HWConfig, shape: Shape, *, level: str | None = None, bits: int = 0) -> dict:
    events, n = {}, shape.elements
    _ops(events, "avgpool", "vector", n)
    if level is not None:
        _read(events, "avgpool", level, n, bits)
    return events


def avgpool_backward(hw: HWConfig, shape: Shape, positions: int, grad_bits: int,
                     level: str) -> dict:
    events, outputs = {}, shape.pooled(positions).elements
    _ops(events, "avgpool_grad", "vector", outputs)
    _read(events, "avgpool_grad", level, outputs, grad_bits)
    return events


def _softmax_rows(hw, events, shape, bits, level, max_at):
    n = shape.elements
    _stats(events, "softmax_max", max_at or range_level(hw), level, n, bits)
    _ops(events, "softmax", "vector", n)
    _read(events, "softmax", level, n, bits)
    _ops(events, "softmax_row", "vector", shape.rows)


def softmax_ce_forward(hw: HWConfig, shape: Shape, bits: int, level: str, *,
                       max_at: str | None = None) -> dict:
    """Softmax cross-entropy over the logits (rows: samples x positions, classes as channels):
    row max, the exp-and-sum pass, per row 1 / sum and the loss. Nothing written but the loss."""
    events = {}
    _softmax_rows(hw, events, shape, bits, level, max_at)
    _ops(events, "ce_row", "vector", shape.rows)
    return events


def softmax_ce_backward(hw: HWConfig, shape: Shape, bits: int, level: str) -> dict:
    """The loss gradient's pass: logits reread, exp recomputed and scaled (the chain writes
    dlogits)."""
    events, n = {}, shape.elements
    _ops(events, "softmax_out", "vector", n)
    _read(events, "softmax_out", level, n, bits)
    return events


def softmax_forward(hw: HWConfig, shape: Shape, bits: int, level: str, *,
                    max_at: str | None = None) -> dict:
    """Softmax over each row of scores: max, exp-and-sum pass, 1 / sum, the pass computing P."""
    events, n = {}, shape.elements
    _softmax_rows(hw, events, shape, bits, level, max_at)
    _ops(events, "softmax_out", "vector", n)
    _read(events, "softmax_out", level, n, bits)
    return events


def softmax_backward(hw: HWConfig, shape: Shape, grad_bits: int, level: str, *, saved_bits: int,
                     saved_level: str) -> dict:
    events, n = {}, shape.elements
    _reduce_then_map(events, ("softmax_grad_sums", "softmax_grad"), n, grad_bits, level,
                     saved_bits, saved_level)
    return events


def gelu_forward(hw: HWConfig, shape: Shape, bits: int, saved_level: str, *,
                 at: str = "array") -> dict:
    """GELU where its input is produced; that input written too, for backward."""
    events, n = {}, shape.elements
    _ops(events, "gelu", at, n)
    merge(events, write(n, bits, saved_level))
    return events


def gelu_backward(hw: HWConfig, shape: Shape, saved_bits: int, saved_level: str, *,
                  at: str = "array") -> dict:
    return _reading("gelu_grad", at, shape.elements, saved_level, saved_bits)


# --- a layer's chain ---------------------------------------------------------------------------

OWNERS = ("bn", "layernorm", "softmax", "softmax_ce")
POOLS = ("maxpool", "avgpool")
# the events of an owner's last pass (what recomputing it repeats) and the writes riders leave
LAST_PASS = ("bn_norm", "ln_norm", "softmax_out", "bn_grad", "ln_grad", "softmax_grad",
             "maxpool", "avgpool", "maxpool_grad", "avgpool_grad")
SIDE_WRITES = ("relu_mask", "pool_index", "pass_write")

Where = Callable[[float, bool], str]


def placement(hw: HWConfig, reserve: int = 0) -> Where:
    """The default rule: TCM if not kept and within `hw.tcm.size_bytes` - `reserve`, else DDR."""
    budget = hw.tcm.size_bytes - reserve

    def where(size: float, kept: bool) -> str:
        return "ddr" if kept or size > budget else "tcm"
    return where


@dataclass
class Chain:
    """One direction of a layer's chain. `events`: all of it, its last pass's write included;
    `last_pass`: that pass's reads and ops; `out`: (elements, bits, level) that pass writes
    (None: no pass; the GEMM's output pipeline did all); `read`: (elements, bits, level) of the
    tensor its first pass reads that the GEMM writes for it (None: none); `range_known`: a
    range containing `out` is known before it is written; `kept`: `out` is written at full
    width whatever a quantizer does; `quantized`: `out` is a GEMM's operand."""
    events: dict
    last_pass: dict = field(default_factory=dict)
    out: tuple | None = None
    read: tuple | None = None
    range_known: bool = False
    kept: bool = False
    quantized: bool = False


def _ops_of(ops) -> tuple:
    return tuple(op if isinstance(op, Op) else Op(op) for op in ops)


def _split(events: dict, names) -> tuple[dict, dict]:
    inside = {k: v for k, v in events.items() if k[0] in names}
    return inside, {k: v for k, v in events.items() if k[0] not in names}


def _ride(done: dict, cur: dict | None, events: dict):
    """A rider's reads and ops join the pass in progress (or, with none, the GEMM's pipeline);
    its side writes happen once."""
    writes, work = _split(events, SIDE_WRITES)
    merge(done, writes)
    merge(done if cur is None else cur, work)


def forward(hw: HWConfig, ops, shape: Shape, *, bits: int, where: Where,
            out_level: str | None = None, stats_at: str | None = None) -> Chain:
    """The forward chain of `ops` on a GEMM output of `shape` stored at `bits`; its last pass
    writes at `out_level` (None: by `where`; a kept output always by `where`)."""
    ops = _ops_of(ops)
    if not ops:
        return Chain({})
    done, cur, read, known = {}, None, None, False
    for op in ops:
        n = shape.elements
        kind = op.kind
        if kind in OWNERS or (kind in POOLS and cur is None):
            saved = kind in ("bn", "layernorm")   # y is read again by its backward
            level = where(nbytes(n, bits), saved)
            if cur is not None:   # the pass before writes what this one reads
                merge(done, cur)
                merge(done, write(n, bits, level))
            else:
                read = (n, bits, level)
            if kind == "bn":
                events = bn_forward(hw, shape, bits, level, stats_at=stats_at)
            elif kind == "layernorm":
                events = layernorm_forward(hw, shape, bits, level, stats_at=stats_at)
            elif kind == "softmax":
                events = softmax_forward(hw, shape, bits, level, max_at=stats_at)
            elif kind == "softmax_ce":
                events = softmax_ce_forward(hw, shape, bits, level, max_at=stats_at)
            elif kind == "maxpool":
                events = maxpool_forward(hw, shape, op.positions, op.window,
                                         _index_level(shape, op, where), level=level, bits=bits)
            else:
                events = avgpool_forward(hw, shape, level=level, bits=bits)
            writes, rest = _split(events, SIDE_WRITES)
            cur, earlier = _split(rest, LAST_PASS)
            merge(done, earlier)
            merge(done, writes)
            known = kind in ("bn", "softmax")
            if kind == "softmax_ce":
                cur = None   # the loss: nothing written
        else:
            at = "array" if cur is None else "vector"
            if kind == "relu":
                events = relu_forward(hw, shape, where(nbytes(n, MASK_BITS), True), at=at)
            elif kind == "add":
                events = add_forward(hw, shape, bits, where(nbytes(n, bits), True), at=at)
                known = False
            elif kind == "gelu":
                events = gelu_forward(hw, shape, bits, where(nbytes(n, bits), True), at=at)
                known = False
            elif kind == "maxpool":
                events = maxpool_forward(hw, shape, op.positions, op.window,
                                         _index_level(shape, op, where))
            else:
                events = avgpool_forward(hw, shape)
            _ride(done, cur, events)
        if kind in POOLS:
            shape = shape.pooled(op.positions or 1)
    last = ops[-1]
    chain = Chain(done, read=read, quantized=last.quantized and last.kind != "softmax_ce")
    if cur is not None:
        n = shape.elements
        level = where(nbytes(n, bits), True) if last.kept else (
            out_level or where(nbytes(n, bits), False))
        merge(chain.events, cur)
        merge(chain.events, write(n, bits, level))
        chain.last_pass, chain.out = cur, (n, bits, level)
        chain.range_known, chain.kept = known, last.kept
    return chain


def _index_level(shape: Shape, op: Op, where: Where) -> str:
    outputs = shape.pooled(op.positions).elements
    return where(nbytes(outputs, index_bits(op.window)), True)


def backward(hw: HWConfig, ops, shape: Shape, *, bits: int, grad_bits: int, where: Where,
             out_level: str | None = None) -> Chain:
    """The backward chain of `ops` (walked from the top) down to the gradient of a GEMM output of
    `shape`; forward tensors stored at `bits`, gradients at `grad_bits`; its last pass writes
    at `out_level` (None: by `where`; kept where a fork's other branch reads it)."""
    ops = _ops_of(ops)
    if not ops:
        return Chain({})
    inputs, s = [], shape   # each op's forward input shape
    for op in ops:
        inputs.append(s)
        if op.kind in POOLS:
            s = s.pooled(op.positions or 1)
    last = ops[-1]
    # the gradient of an output only an add reads is the add's: the other operand's chain reads
    # it too
    kept = not last.quantized and last.kept
    done, cur, read = {}, None, None
    for op, s in zip(reversed(ops), reversed(inputs)):
        n = s.elements
        out = s.pooled(op.positions or 1) if op.kind in POOLS else s
        if op.kind in OWNERS or op.kind in POOLS:
            level = where(nbytes(out.elements, grad_bits), kept)
            if cur is not None:   # the pass before writes the gradient this one reads
                merge(done, cur)
                merge(done, write(out.elements, grad_bits, level))
            elif op.kind != "softmax_ce":
                read = (out.elements, grad_bits, level)
            kept = False
            saved = where(nbytes(n, bits), True)
            if op.kind == "bn":
                events = bn_backward(hw, s, grad_bits, level, saved_bits=bits, saved_level=saved)
            elif op.kind == "layernorm":
                events = layernorm_backward(hw, s, grad_bits, level, saved_bits=bits,
                                            saved_level=saved)
            elif op.kind == "softmax":   # P kept as the context GEMM's input codes
                events = softmax_backward(hw, s, grad_bits, level, saved_bits=FORWARD_BITS,
                                          saved_level=where(nbytes(n, FORWARD_BITS), True))
            elif op.kind == "softmax_ce":   # no gradient comes in: the logits are reread
                events = softmax_ce_backward(hw, s, bits, where(nbytes(n, bits), False))
            elif op.kind == "maxpool":
                events = maxpool_backward(hw, s, op.positions, op.window, grad_bits, level,
                                          _index_level(s, op, where))
            else:
                events = avgpool_backward(hw, s, op.positions or 1, grad_bits, level)
            cur, earlier = _split(events, LAST_PASS)
            merge(done, earlier)
        elif op.kind == "add":   # fans out; the fork's gradients are summed where they meet
            fork = Shape(s.samples, *op.fork) if op.fork else s
            level = where(nbytes(fork.elements, grad_bits), True)
            merge(done, add_backward(hw, fork, grad_bits, level))
            kept = True
        else:
            at = "array" if cur is None else "vector"
            if op.kind == "relu":
                events = relu_backward(hw, s, where(nbytes(n, MASK_BITS), True), at=at)
            else:
                events = gelu_backward(hw, s, bits, where(nbytes(n, bits), True), at=at)
            _ride(done, cur, events)
    chain = Chain(done, read=read, quantized=True)
    if cur is not None:
        n = shape.elements
        level = where(nbytes(n, grad_bits), True) if kept else (
            out_level or where(nbytes(n, grad_bits), False))
        merge(chain.events, cur)
        merge(chain.events, write(n, grad_bits, level))
        chain.last_pass, chain.out, chain.kept = cur, (n, grad_bits, level), kept
    return chain


# --- sharing with the quantizer of what a chain writes -----------------------------------------

MODES = ("auto", "exact", "store", "recompute")


def _copy(events: dict) -> dict:
    return {k: list(v) for k, v in events.items()}


def _take(events: dict, event: str, count: int, size: float, levels=MEMORY):
    """Remove one tensor's worth (`count` elements, `size` bytes) of `event` at whichever of
    `levels` it happened at."""
    for level in levels:
        row = events.get((event, level))
        if row is not None:
            row[0] -= count
            row[1] -= size
            if row[0] < 0 or row[1] < -1e-6:
                raise ValueError(f"pair: {event} at {level} is less than one tensor")
            if row[0] == 0 and abs(row[1]) < 1e-6:
                del events[(event, level)]
            return
    raise ValueError(f"pair: the quantizer's events have no {event}")


def _has(events: dict, event: str, levels=MEMORY) -> bool:
    return any((event, level) in events for level in levels)


def pair(hw: HWConfig, quant: dict, chain: Chain, *, shared: bool, mode: str = "auto") -> dict:
    """Raw events of `chain` and the quantizer(s) of the tensor its last pass writes: `quant`
    as `schedule.input_events` returns it (merged, for a gradient quantized twice), planned at
    the level the pass writes to. `shared`: False, the tensor written once, then the quantizer's
    own passes; True, riding the chain's pass by `mode` (see the module docstring; "auto": exact
    where the range is known, else the cheaper on `hw` of store and recompute)."""
    if chain.out is None or not chain.quantized:
        raise ValueError("pair: this chain's last pass writes no GEMM operand")
    if mode not in MODES:
        raise ValueError(f"pair mode: got {mode!r}; expected one of {', '.join(MODES)}")
    elements = chain.out[0]
    wide = nbytes(elements, wide_store_bits(hw))
    q = _copy(quant)
    events = _copy(chain.events)
    if not _has(q, "wide_write"):   # delayed ranges: requantized as the pass produces it
        if not chain.kept:
            _take(events, "pass_write", elements, nbytes(elements, chain.out[1]), (chain.out[2],))
        for (event, level), row in list(q.items()):   # by the vector unit, not a GEMM's pipeline
            if level == "array" and event in ("sr_rng", "requantize", "block_max", "block_scale",
                                              "rotate"):
                del q[(event, level)]
                add(q, "requant_pass" if event == "requantize" else event, "vector", row[0])
        merge(events, q)
        return events
    if chain.kept:   # written wide for a later add whatever the quantizer does: the chain's
        _take(q, "wide_write", elements, wide)
    else:            # the pass's write is the quantizer's wide tensor, and charged as such
        _take(events, "pass_write", elements, nbytes(elements, chain.out[1]), (chain.out[2],))
    if (("wide_scale", "array")) in q:        # a vector pass writes in its own format
        _take(q, "wide_scale", elements, 0.0, ("array",))
    merge(events, q)
    if not shared:
        return events
    bhq = _has(q, "sort", ("vector",)) or _has(q, "transform", ("vector",))
    allowed = {"store"}
    if chain.range_known and not bhq:
        allowed.add("exact")
    if not chain.kept and not bhq:
        allowed.add("recompute")
    if mode != "auto" and mode not in allowed:
        raise ValueError(f"pair: mode {mode!r} does not apply here (applies: "
                         f"{', '.join(sorted(allowed))})")
    store = _copy(events)
    if _has(store, "range_pass"):   # min/max as the pass writes: no read back
        _take(store, "range_pass", elements, wide)
    if mode == "store" or (mode == "auto" and allowed == {"store"}):
        return store
    codes = _copy(store)   # the pass writes the codes: no wide tensor to requantize from
    _take(codes, "requant_pass", elements, wide)
    if not chain.kept:
        _take(codes, "wide_write", elements, wide)
    if mode == "exact" or (mode == "auto" and "exact" in allowed):
        return codes
    merge(codes, chain.last_pass)   # recompute: the pass once more, for the range
    if mode == "recompute":
        return codes
    return min((store, codes), key=lambda e: priced_pj(hw, e))


def priced_pj(hw: HWConfig, events: dict) -> float:
    """pJ of raw between-layer events, static power over their cycles included."""
    return sum(row[5] for row in price(hw, "between", GemmSpec(FORWARD_BITS, FORWARD_BITS), events))


# --- a whole step ------------------------------------------------------------------------------

def _scaled(events: dict, times: int) -> dict:
    return {k: [c * times, b * times, cy * times] for k, (c, b, cy) in events.items()}


def _wide_level(events: dict) -> str | None:
    return next((level for event, level in events
                 if event == "wide_write" and level in MEMORY), None)


def _layer(hw, layer: Layer, batch: int, *, bits, grad_bits, code_bits, where, budget,
           quantizer, range_policy, activation_policy, first: bool, pairs: bool):
    """(forward chain, its quantizer events or None, backward chain, its quantizers' or None)."""
    shape = Shape(batch * layer.repeat, layer.n, layer.rows)
    ops = layer.between
    fwd = forward(hw, ops, shape, bits=bits, where=where)
    fq = None
    if pairs and fwd.out is not None and fwd.quantized:
        n = fwd.out[0]   # per tensor: any split of its elements into rows and columns
        scheme = activation_scheme(activation_policy, Producer(0 if fwd.kept else budget, 1))
        groups = shape.samples if layer.per_sample else 1   # a tensor per sample and repeat
        fq = _scaled(input_events(hw, None, scheme, n // shape.samples, shape.samples // groups,
                                  FORWARD_BITS), groups)
        fwd = forward(hw, ops, shape, bits=bits, where=where, out_level=_wide_level(fq))
    bwd = backward(hw, ops, shape, bits=bits, grad_bits=grad_bits, where=where)
    bq = None
    if pairs and bwd.out is not None and layer.kind == "gemm":   # an embedding's is scattered
        # dY (M x N per GEMM) quantized for grad_input (per row) and grad_weight (per column)
        (m, times), k = layer.gemms(batch), layer.n
        producer = Producer(0 if bwd.kept else budget, 1)   # a vector pass: a sample at a time
        bq, wide_at = {}, None
        if not first:
            scheme = QuantScheme(quantizer, range_policy, rows_per_sample=layer.group_rows,
                                 producer=producer)
            bq = input_events(hw, None, scheme, m, k, code_bits)
            wide_at = _wide_level(bq)
        scheme = QuantScheme(weight_gradient_method(quantizer), unpredicted(range_policy),
                             shared_at=wide_at, producer=by_columns(producer))
        merge(bq, input_events(hw, None, scheme, k, m, GRAD_WEIGHT_BITS))
        bq = _scaled(bq, times)
        bwd = backward(hw, ops, shape, bits=bits, grad_bits=grad_bits, where=where,
                       out_level=_wide_level(bq))
    return fwd, fq, bwd, bq


def step(hw: HWConfig, layers, batch: int, *, shared: bool = False, quantizer: str = "psq",
         range_policy: str = "dynamic", activation_policy: str = "dynamic",
         bits: int | None = None, grad_bits: int | None = None, code_bits: int = 8,
         reserve: int = 0, where: Where | None = None, quantizers: bool = True,
         mode: str = "auto") -> dict[str, dict]:
    """Raw events of the ops between the GEMMs of one training step of `layers` at `batch`
    samples, per layer (forward and backward chains). With `quantizers`, each chain whose last
    pass writes a GEMM operand is priced with that operand's quantizers (forward: the 8-bit
    per-tensor activation codes under `activation_policy`; backward: the gradient's, under
    `quantizer` and `range_policy`, for grad_input (not the first layer) and grad_weight), shared
    or not (`pair`); the others' quantizers are the GEMMs' as today. Tensors are stored at
    `bits` forward and `grad_bits` backward (default: the config's wide width) and live where
    `where` puts them (default `placement(hw, reserve)`)."""
    wide = wide_store_bits(hw)
    bits, grad_bits = bits or wide, grad_bits or wide
    where = where or placement(hw, reserve)
    out = {}
    for i, layer in enumerate(layers):
        if not layer.between:
            continue
        fwd, fq, bwd, bq = _layer(hw, layer, batch, bits=bits, grad_bits=grad_bits,
                                  code_bits=code_bits, where=where,
                                  budget=hw.tcm.size_bytes - reserve, quantizer=quantizer,
                                  range_policy=range_policy, activation_policy=activation_policy,
                                  first=i == 0, pairs=quantizers)
        events = {}
        for chain, quant in ((fwd, fq), (bwd, bq)):
            merge(events, chain.events if quant is None else
                  pair(hw, quant, chain, shared=shared, mode=mode))
        out[layer.name] = events
    return out


def gemm_writes(hw: HWConfig, layers, batch: int, *, bits: int | None = None,
                grad_bits: int | None = None, reserve: int = 0, where: Where | None = None) -> dict:
    """What the GEMMs must write for the chains to read (`Chain.read`), as write-back events:
    forward, the output a chain's first pass reads, at `bits` (in place of fused codes);
    backward, the gradient the GEMM above writes for a chain's first pass (today the layer's
    quantizer's wide_write, which the chain's last pass now writes)."""
    wide = wide_store_bits(hw)
    bits, grad_bits = bits or wide, grad_bits or wide
    where = where or placement(hw, reserve)
    events = {}
    for layer in layers:
        shape = Shape(batch * layer.repeat, layer.n, layer.rows)
        for chain in (forward(hw, layer.between, shape, bits=bits, where=where),
                      backward(hw, layer.between, shape, bits=bits, grad_bits=grad_bits,
                               where=where)):
            if chain.read is not None:
                n, b, level = chain.read
                add(events, "writeback", level, n, nbytes(n, b))
    return events


def total(per_layer: dict[str, dict]) -> dict:
    """All layers' raw events in one dict."""
    events = {}
    for more in per_layer.values():
        merge(events, more)
    return events


# --- one layer's ops in a training step, as the step and the device charge them -----------------

@dataclass(frozen=True)
class Around:
    """A layer's ops between the GEMMs in one training step, and what they change for the GEMMs
    beside them. `forward`, `backward`: the chains' raw events, with the write-back of the
    tensor each chain's first pass reads (forward: this layer's output y, which its GEMM then
    hands on at full width to the chain; backward: dZ, written by the grad_input GEMM above)
    and, where the chain's last pass writes a GEMM operand, that operand's quantizers
    (`pair`). `y_read`: the output GEMM's result is read by a pass (not quantized as it is
    written). `x_coded`: the next layer's input codes are the forward chain's (its GEMM
    quantizes nothing). `dz_read`: the grad_input GEMM above writes this layer's dZ for a pass.
    `dy_coded`: this layer's gradient codes are the backward chain's. `x_wide`, `dy_wide`:
    those codes were made from a copy stored at full width (which rounds to the wide format),
    not straight from the pass. `dx_level`: where the backward chain's last pass writes the
    gradient of its layer's output (an embedding's scatter reads it there)."""
    forward: dict
    backward: dict
    y_read: bool
    x_coded: bool
    dz_read: bool
    dy_coded: bool
    x_wide: bool = False
    dy_wide: bool = False
    dx_level: str | None = None


NONE = Around({}, {}, False, False, False, False)


def around(hw: HWConfig, layer: Layer, batch: int, *, first: bool, quantizer: str,
           range_policy: str, grad_bits: int, activation_policy: str | None = None) -> Around:
    """`layer`'s ops in a step of `batch` samples (see `Around`): tensors at the config's wide
    width where `placement` puts them; the quantizers riding the chains' passes where
    `pipeline.share_passes` says so; forward activations under `activation_policy` (default:
    the gradients' `range_policy`)."""
    if not layer.between:
        return NONE
    wide = wide_store_bits(hw)
    fwd, fq, bwd, bq = _layer(hw, layer, batch, bits=wide, grad_bits=wide, code_bits=grad_bits,
                              where=placement(hw), budget=hw.tcm.size_bytes, quantizer=quantizer,
                              range_policy=range_policy,
                              activation_policy=activation_policy or range_policy,
                              first=first, pairs=True)
    shared = hw.pipeline.share_passes
    chains = []
    for chain, quant in ((fwd, fq), (bwd, bq)):
        events = _copy(chain.events if quant is None else pair(hw, quant, chain, shared=shared))
        if chain.read is not None:   # what the GEMM beside it writes for the first pass, after
            n, bits, level = chain.read   # its compute (in the time a pass would take to write it)
            add(events, "writeback", level, n, nbytes(n, bits),
                pass_memory_cycles(hw, level, "write", nbytes(n, bits)))
            sums = chain is bwd or layer.kind == "gemm"   # an embedding's lookup sums nothing
            if hw.pipeline.wide_format != "accumulator" and sums:
                add(events, "wide_scale", "array", n)
        chains.append(events)
    return Around(chains[0], chains[1], fwd.read is not None, fq is not None,
                  bwd.read is not None, bq is not None,
                  x_wide=fq is not None and _has(chains[0], "wide_write"),
                  dy_wide=bq is not None and _has(chains[1], "wide_write"),
                  dx_level=None if bwd.out is None else bwd.out[2])
