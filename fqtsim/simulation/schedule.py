"""What the hardware must do around a GEMM whose A operand is quantized on the device from a
wide tensor, in closed form.

The GEMM is dX = Q(dY) @ W: A = dY (M x K, rows = samples) arrives at full width from the GEMM
that produced it; B = W holds symmetric weight codes. The same passes quantize a forward
activation (per tensor, to nearest: `stochastic=False`) handed off by the layer below. Per scheme:

dynamic ranges (the range depends on the data itself, as in the paper):
    wide_write    dY at full width (raw sums, or fp32/bf16: `pipeline.wide_format`), written by
                  its producer (the layer above's grad_input, or the loss for the top layer), to
                  TCM if its live scope fits what the producer leaves free, else DDR. Scope: the
                  whole tensor for PTQ and BHQ (BHQ sorts and mixes rows from anywhere); whole
                  rows for PSQ, which a producing GEMM finishes band by band (one row tile, whole
                  samples) only with the m loop outer or a single column tile, and the loss one
                  sample at a time (`wide_gradient_level`, `mapping.produced_by`). A GEMM costed
                  on its own takes its producer to be tiled like itself.
    range_pass    min/max per element: by comparators in the producer's output pipeline as it
                  writes (`pipeline.range: fused`, the default), or a read pass (`pass`)
    sort          BHQ: bitonic network over the M row ranges (data independent)
    transform     BHQ: read, block Householder + row scale (3 mul + 2 add); dynamic: min/max of
                  the transformed rows and a second wide_write; delayed: requantize straight out
    requant_pass  read, one requantization per element (and a random number: sr_rng)
    code_write    b-bit codes to DDR, where the GEMM loads A from
delayed ranges (known before the producer's GEMM, from a history of past ranges) and predicted
ones (per sample, from the loss gradient's norms: range_predict, two log-linear bounds per
sample on the vector unit; `fqtsim.quantizers.ranges.PredictedRange`): PTQ and PSQ
requantize in the producer's output pipeline (sr_rng, requantize) and write only codes; values
outside the range are clipped (counted by the device). BHQ still needs the wide tensor, one range
pass and the sort to build its transform, but requantizes on the way out of the transform pass.
after the GEMM:
    colsum, zero_point   the codes stand for offset + scale * q: add offset_i * colsum(W)_j
                         (`correction_events`, for any GEMM with affine operands); a weight's
                         column sums are kept by the update pass that writes its codes
    BHQ: T^-1 mixes output rows. Gathered (`pipeline.bhq_inverse: gather`, where one row tile
    holds all M rows: `gathers`): A's rows load in the sort's order and T^-1 runs on each
    output tile in the pipeline (inverse_rows) before the fused write-back. Otherwise the output
    is written at full width (whole tensor), T^-1 applied to its rows and the result requantized
    (inverse_transform) and written as codes (inverse_codes), in place of the fused write-back.
A gradient quantized twice (per row for dX, per column for dW) is written wide once: the second
scheme is `shared_at` the level the first one wrote it to; its ranges ride along, and it emits its
codes from the first one's read (requantization or transform pass), moving no wide bytes itself.
mxint (block-scaled codes, `fqtsim.quantizers.mx`, blocks of `pipeline.block` along K) needs no
range before the data under any policy (the run's policy still rules its activations):
    block_max     the producer's output pipeline tracks each block's max |x| as it writes
    block_scale   and sets the block's exponent (a leading-one detect), then requantizes (sr_rng,
                  requantize) and writes the codes (code_write) and one scale byte per block
                  (scale_write); dX's copy has its blocks along dY's rows, dW's along its columns
                  (the producer's output tiles hold whole blocks of rows), each written once
in the consuming GEMM (`block_events`):
    scale_load    A's scale bytes come with its tiles (one per block of the elements loaded) and
    scale_read    go to the array with them
    block_ref     the least exponent of each row of A, as its scale bytes arrive
    block_align   each block's partial sum shifted by its exponent above the row's least and added
                  into the running sum (`kernels.block_gemm`): one shift and one wide add
hadamard (`fqtsim.quantizers.rotation`: dY's rows rotated by R along K, blocks of
`pipeline.block`, then PSQ) costs what PSQ costs, plus R's butterflies (`rotate`, adds): dynamic,
dY is written wide as it is (Q_bw's ranges ride that write) and the requantization pass rotates
each row and ranges it (a vector range pass) before requantizing; delayed, the producer's pipeline
rotates and requantizes. The update writes grad_input's codes of R^T W (`update_events`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fqtsim.hardware.hw import HWConfig
from fqtsim.simulation.ledger import add, merge
from fqtsim.hardware.mapping import (Producer, Tiling, as_int, nbytes, produced_by,
                                     wide_store_bits)
from fqtsim.quantizers import GRADIENT_METHODS
from fqtsim.quantizers.storage import FP32_STATE, StateFormats
from fqtsim.quantizers.rotation import rotation_adds
from kernels.blocks import MAX_ACC_BITS

METHODS = GRADIENT_METHODS
RANGE_POLICIES = ("dynamic", "delayed", "predicted")


def range_policies(method: str) -> tuple:
    """The range policies a run with gradient quantizer `method` can take: mxint's blocks
    have no range to predict (dynamic and delayed rule its activations); hadamard's rotated
    rows are not what the loss's norms predict."""
    return ("dynamic", "delayed") if method in ("mxint", "hadamard") else RANGE_POLICIES


SCHEMES = tuple((q, r) for q in METHODS for r in range_policies(q))   # every (quantizer, policy)


@dataclass(frozen=True)
class QuantScheme:
    """A gradient quantizer and its range policy."""
    method: str
    range_policy: str = "dynamic"
    shared_at: str | None = None   # another quantizer of the same gradient already wrote it wide
                                   # to this level and reads it for ranges: no second wide_write,
                                   # its min/max ride along
    rows_per_sample: int = 1   # conv layers: im2col rows per sample (PSQ/BHQ group by sample)
    stochastic: bool = True    # stochastic rounding (gradients); False: to nearest (activations)
    coded: bool = False        # its codes were written by the pass that produced the tensor
                               # (an op between the GEMMs: fqtsim.simulation.between), which
                               # charges its quantization: nothing to do before the GEMM
    producer: Producer | None = None   # what wrote the gradient wide (the layer above's
                                       # grad_input, or the loss); None: a GEMM on its own, its
                                       # producer taken to be tiled like it

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"quantizer: got {self.method!r}; expected one of {', '.join(METHODS)}")
        if not isinstance(self.range_policy, str) or self.range_policy not in RANGE_POLICIES:
            raise ValueError(f"range policy: got {self.range_policy!r}; expected one of "
                             f"{', '.join(RANGE_POLICIES)}")
        if self.range_policy not in range_policies(self.method):
            raise ValueError(f"range policy {self.range_policy}: {self.method} takes "
                             f"{', '.join(range_policies(self.method))} (mxint's block scales "
                             f"come from each block as its producer writes it; hadamard ranges "
                             f"rotated rows, which the loss's norms do not predict)")
        if self.shared_at not in (None, "tcm", "ddr"):
            raise ValueError(f"shared_at: got {self.shared_at!r}; expected None, 'tcm' or 'ddr'")
        rows = self.rows_per_sample
        if as_int(rows) is None or rows < 1:
            raise ValueError(f"rows_per_sample: got {rows!r}; expected an integer >= 1")
        for flag in ("stochastic", "coded"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: got {getattr(self, flag)!r}; expected True or False")
        if self.producer is not None and not isinstance(self.producer, Producer):
            raise ValueError(f"producer: got {self.producer!r}; expected a "
                             f"fqtsim.hardware.mapping.Producer or None")

    @property
    def affine(self) -> bool:
        """Whether its codes carry offsets to correct after the GEMM (mxint's are symmetric)."""
        return self.method != "mxint"

    @property
    def materializes(self) -> bool:
        """Whether the GEMM's producer must write dY at full width before it can be requantized
        (not where a pass between the GEMMs writes its codes)."""
        return not self.coded and self.method != "mxint" and \
            (self.range_policy == "dynamic" or self.method == "bhq")


def as_scheme(scheme, argument: str = "a_quant") -> QuantScheme | None:
    """A `QuantScheme` as given; a method name ("ptq", "psq", "bhq") as that method with dynamic
    ranges; None as None. Anything else is a TypeError naming `argument`."""
    if scheme is None or isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, str):
        if scheme not in METHODS:
            raise ValueError(f"{argument}: got {scheme!r}; expected a QuantScheme or one of "
                             f"{', '.join(METHODS)}")
        return QuantScheme(scheme)
    raise TypeError(f"{argument}: got {scheme!r} ({type(scheme).__name__}); expected a "
                    f"fqtsim.simulation.schedule.QuantScheme, a method name "
                    f"({', '.join(METHODS)}) or None")


def quantized_shape(m: int, k: int, win) -> tuple[int, int]:
    """The tensor a quantizer of A (M x K) reads: A itself, or for a conv's im2col operand
    (`win`, its `fqtsim.hardware.conv.Im2col`) the input map it is built from (its pixels x
    channels): each input element is quantized once, however many windows read it."""
    if win is None:
        return m, k
    return win.samples * win.in_h * win.in_w, win.channels


def bitonic_compares(n: int) -> int:
    """Compare-exchanges of a bitonic sorting network on n keys padded to a power of two."""
    if n <= 1:
        return 0
    p = math.ceil(math.log2(n))
    return (1 << p) // 2 * p * (p + 1) // 2


def wide_gradient_level(hw: HWConfig, tiling: Tiling, scheme: QuantScheme, m: int, k: int) -> str:
    """Where the wide gradient A (M x K) lives: where a sharing quantizer put it, else TCM if its
    live scope fits what its producer leaves free, else DDR. The scope is the whole tensor for
    PTQ and BHQ; for PSQ the whole samples the producer completes at a time (per-sample min/max
    ride along in any output pipeline; requantizing needs whole rows)."""
    if scheme.shared_at is not None:
        return scheme.shared_at
    producer = scheme.producer or produced_by(tiling, k, scheme.rows_per_sample)
    live = m * k
    if scheme.method in ("psq", "hadamard") and producer.samples_at_once is not None:
        live = min(m, producer.samples_at_once * scheme.rows_per_sample) * k
    return "tcm" if nbytes(live, wide_store_bits(hw)) <= producer.free else "ddr"


def gathers(hw: HWConfig, scheme: QuantScheme | None, tiling: Tiling, m: int) -> bool:
    """Whether BHQ's T^-1 runs in the output pipeline (`pipeline.bhq_inverse: gather`): A's
    rows are loaded in the sort's order (a DMA gather of whole rows: the same bytes), so each
    block's rows are adjacent, and the row tile holds all M rows, so that every block (data
    dependent: one may span the batch) is whole in each output tile."""
    return (scheme is not None and scheme.method == "bhq" and tiling.tm >= m
            and hw.pipeline.bhq_inverse == "gather")


def output_writeback(scheme: QuantScheme | None, writeback: str, scope: str,
                     gathered: bool = False) -> tuple[str, str]:
    """BHQ's T^-1 mixes output rows: unless it runs in the pipeline (`gathers`), its GEMM
    output is materialized whole at full width."""
    if scheme is not None and scheme.method == "bhq" and not gathered:
        return "materialized", "tensor"
    return writeback, scope


def rename_wide_output(events: dict, scheme: QuantScheme | None, gathered: bool = False):
    """Charge BHQ's forced wide output write to BHQ (wide_output), not to the plain write-back."""
    if scheme is not None and scheme.method == "bhq" and not gathered:
        for level in ("tcm", "ddr"):
            if ("writeback", level) in events:
                events[("wide_output", level)] = events.pop(("writeback", level))


def scale_events(hw: HWConfig, scheme: QuantScheme | None, writeback: str, elements: int,
                 gathered: bool = False) -> dict:
    """A GEMM output materialized in fp32 or bf16: its sums are scaled on the way out."""
    events = {}
    if hw.pipeline.wide_format != "accumulator" and \
            output_writeback(scheme, writeback, "tensor", gathered)[0] == "materialized":
        add(events, "wide_scale", "array", elements)
    return events


def input_events(hw: HWConfig, tiling: Tiling, scheme: QuantScheme, m: int, k: int,
                 a_bits: int) -> dict:
    """Raw events of quantizing the wide gradient A (M x K) into `a_bits`-bit codes."""
    events = {}
    elements = m * k
    if scheme.coded:
        return events
    if scheme.range_policy == "predicted":   # each sample's bounds, from its loss gradient
        add(events, "range_predict", "vector", m // scheme.rows_per_sample)
    if scheme.method == "mxint":   # each block's scale set as the producer writes it
        blocks = m * -(-k // hw.pipeline.block)
        add(events, "block_max", "array", elements)
        add(events, "block_scale", "array", blocks)
    if not scheme.materializes:   # requantized in the producer's output pipeline
        if scheme.method == "hadamard":   # rows rotated in the pipeline, then requantized
            add(events, "rotate", "array", m * rotation_adds(k, hw.pipeline.block))
        if scheme.stochastic:
            add(events, "sr_rng", "array", elements)
        add(events, "requantize", "array", elements)
        add(events, "code_write", "ddr", elements, nbytes(elements, a_bits))
        if scheme.method == "mxint":
            add(events, "scale_write", "ddr", blocks, blocks)
        return events
    wide = nbytes(elements, wide_store_bits(hw))
    level = wide_gradient_level(hw, tiling, scheme, m, k)
    ranges_at = range_level(hw)
    if scheme.shared_at is None:
        add(events, "wide_write", level, elements, wide)
        if hw.pipeline.wide_format != "accumulator":
            add(events, "wide_scale", "array", elements)
        if ranges_at == "vector":
            add(events, "range_pass", level, elements, wide)
    add(events, "range_pass", ranges_at, elements)
    if scheme.method == "hadamard":   # its pass rotates each row, ranges it, requantizes it
        add(events, "rotate", "vector", m * rotation_adds(k, hw.pipeline.block))
        add(events, "range_pass", "vector", elements)
    codes_from = "requant_pass"
    if scheme.method == "bhq":
        add(events, "sort", "vector", bitonic_compares(m // scheme.rows_per_sample))
        add(events, "transform", "vector", elements)
        add(events, "transform", level, elements, wide)
        if scheme.range_policy == "dynamic":  # transformed rows written wide again, ranged on the way
            add(events, "wide_write", level, elements, wide)
            add(events, "range_pass", "vector", elements)
        else:
            codes_from = "transform"
    # a second quantizer of a shared gradient emits its codes from the first one's read
    if codes_from == "requant_pass" and scheme.shared_at is None:
        add(events, "requant_pass", level, elements, wide)
    add(events, "requant_pass", "vector", elements)
    if scheme.stochastic:
        add(events, "sr_rng", "vector", elements)
    add(events, "code_write", "ddr", elements, nbytes(elements, a_bits))
    return events


def range_level(hw: HWConfig) -> str:
    """Where a wide tensor's min/max are found: by comparators in the output pipeline that
    writes it ("array", no extra read), or by a vector pass that reads it back."""
    return "array" if hw.pipeline.range == "fused" else "vector"


def output_events(hw: HWConfig, scheme: QuantScheme, m: int, n: int, out_bits: int, level: str,
                  handoff: bool, gathered: bool = False) -> dict:
    """Raw events after the GEMM for BHQ: T^-1 on the output, which was written at full width
    to `level`, then requantized and written as codes (unless handed off at full width); or,
    `gathered`, T^-1 on each output tile in the pipeline before its write-back."""
    events = {}
    if scheme.method == "bhq" and gathered:
        add(events, "inverse_rows", "array", m * n)
    elif scheme.method == "bhq":
        add(events, "inverse_transform", level, m * n, nbytes(m * n, wide_store_bits(hw)))
        add(events, "inverse_transform", "vector", m * n)
        if not handoff:
            add(events, "inverse_codes", "ddr", m * n, nbytes(m * n, out_bits))
    return events


def block_scaled_problem(hw: HWConfig) -> str | None:
    """Why `hw` cannot run block-scaled (mxint) GEMMs, or None: their running sums stay in
    the accumulator (no spills are modeled for them) and its aligned adds are emulated up to
    `kernels.blocks.MAX_ACC_BITS`."""
    acc = hw.accumulator
    if acc.spill_every is None and acc.bits <= MAX_ACC_BITS:
        return None
    return (f"{hw.name}'s accumulator ({acc.bits} bits, spill_every {acc.spill_every}) is not one "
            f"a block-scaled GEMM keeps its running sums in; it needs accumulator.spill_every: "
            f"null and at most {MAX_ACC_BITS} bits (pick another config or quantizer)")


def block_events(hw: HWConfig, scheme: QuantScheme | None, m: int, n: int, k: int,
                 events: dict) -> dict:
    """Raw events of a GEMM whose A (M x K) is block-scaled (mxint), beyond its MACs: the
    scale bytes that come with A's tiles (`events`: the loop nest's, whose A loads and reads
    they follow), each row's least exponent, and each block's aligned add into the running
    sum. Nothing for other schemes."""
    out = {}
    if scheme is None or scheme.method != "mxint":
        return out
    if (problem := block_scaled_problem(hw)) is not None:
        raise ValueError(f"mxint: {problem}")
    block = hw.pipeline.block
    for event, level, scale_event in (("load_a", "ddr", "scale_load"), ("read_a", "tcm", "scale_read")):
        scales = -(-events.get((event, level), [0])[0] // block)
        if scales:
            add(out, scale_event, level, scales, scales)
    blocks = -(-k // block)
    add(out, "block_ref", "array", m * blocks)
    add(out, "block_align", "array", m * n * blocks)
    return out


def correction_events(m: int, n: int, k: int, a_offset: bool, b_offset: bool,
                      b_sums_known: bool = False) -> dict:
    """Rank-1 corrections for affine codes (offset + scale * q): with A's offsets, B's column
    sums and one multiply-add per output; with B's, A's row sums and another; with both, a third
    for the K * offset_a * offset_b term. `b_sums_known`: B is a weight whose column sums the
    update pass keeps (`update_events`), so the GEMM does not sum it again."""
    events = {}
    if a_offset:
        if not b_sums_known:
            add(events, "colsum", "vector", k * n)
        add(events, "zero_point", "vector", m * n)
    if b_offset:
        add(events, "rowsum", "vector", m * k)
        add(events, "zero_point", "vector", m * n)
    if a_offset and b_offset:
        add(events, "zero_point", "vector", m * n)
    return events


FORWARD_BITS = 8    # forward activation and weight codes (per tensor, round to nearest)
GRAD_WEIGHT_BITS = 8   # Q_bw, the weight-gradient GEMM's quantizer


def unpredicted(range_policy: str) -> str:
    """The policy of a quantizer whose groups are not samples (the forward activations' tensor,
    Q_bw's output features) under the run's `range_policy`: ranges are predicted per sample from
    the loss, so those take ranges from their history instead (delayed)."""
    return "delayed" if range_policy == "predicted" else range_policy


def activation_scheme(policy: str, producer: Producer | None = None,
                      coded: bool = False) -> QuantScheme:
    """The forward activation quantizer: per tensor, to nearest, under the run's range policy."""
    return QuantScheme("ptq", unpredicted(policy), stochastic=False, producer=producer, coded=coded)


def activation_consumer(policy: str) -> tuple:
    """(method, policy, bits) of the activation quantizer, as a GEMM's `consumer`."""
    return "ptq", unpredicted(policy), FORWARD_BITS


# The like-for-like baseline a scheme's extra cost is measured against: ranges known before their
# GEMMs, so only the random numbers, requantizations and code writes every quantizer pays
BASELINE = QuantScheme("ptq", "delayed")


def weight_gradient_method(quantizer: str) -> str:
    """Q_bw on dY^T (rows = output features): per tensor with PTQ, per feature with PSQ/BHQ;
    mxint: blocks along its rows (over samples, the weight-gradient GEMM's K)."""
    return quantizer if quantizer in ("ptq", "mxint") else "psq"


def update_events(hw: HWConfig, params: int, grad_level: str, state_at: str = "ddr",
                  sums: int = 1, bias: int = 0, formats: StateFormats = FP32_STATE,
                  channels: int = 1, codes: bool = True, rotated: bool = False) -> dict:
    """SGD with momentum on the vector unit for `params` weights in `channels` rows (output
    channels), whose gradient the weight-gradient GEMM left at full width in `grad_level`: it
    reads the gradient and the stored weights and momentum (in `formats`, at `state_at`: TCM
    where the step leaves room for them, see `fqtsim.simulation.cost`), updates them in fp32 and
    writes them back in their formats (`format_events`: decoding, peaks, rounding, random
    numbers). The GEMMs load 8-bit weight codes from DDR (`weight_code_sets`: the update writes
    them, with `sums` sets of their column sums, one per GEMM that corrects zero points with
    them: forward, and grad_input where there is one). `bias`: bias parameters updated the same
    way, their gradient (`bias_events`) read from TCM and the new biases written to DDR at
    their stored width, where the output pipeline adds them (a 1-D tensor: one scale, one
    momentum block). `codes`: False for a table no GEMM reads (an embedding, looked up as
    stored): no codes, no column sums. `rotated`: grad_input reads codes of R^T W (the hadamard
    quantizer's, `fqtsim.quantizers.rotation`): each column rotated along the channels, peaked
    and requantized per tensor, and written as a code set of its own."""
    weights, momentum = formats.weights, formats.momentum
    per_value = weights.buffers + 1   # values moved per parameter: its weight buffers, momentum
    events = {}
    add(events, "optimizer_read", grad_level, params, nbytes(params, wide_store_bits(hw)))
    stored = state_bytes(params, formats, channels)
    add(events, "optimizer_read", state_at, per_value * params, stored)
    add(events, "optimizer_write", state_at, per_value * params, stored)
    sets = weight_code_sets(formats, state_at, sums) if codes else 0
    if rotated:   # grad_input's codes are R^T W's: rotated, peaked and requantized here
        add(events, "rotate", "vector", params // channels * rotation_adds(channels, hw.pipeline.block))
        if weights.scales != "row":   # int8 weights make grad_input's per-tensor codes anyway
            add(events, "state_peak", "vector", params)
            add(events, "state_requant", "vector", params)
            sets += 1
    if sets:
        add(events, "optimizer_write", "ddr", sets * params, sets * nbytes(params, FORWARD_BITS))
    add(events, "weight_update", "vector", params)
    merge(events, format_events(formats, params))
    if weights.scales == "row" and sums > 1 and codes:   # grad_input's per-tensor codes of them
        add(events, "state_requant", "vector", params)
    if codes:
        add(events, "colsum", "vector", sums * params)
    if bias:
        add(events, "optimizer_read", "tcm", bias, nbytes(bias, wide_store_bits(hw)))
        stored = state_bytes(0, formats, bias=bias)
        add(events, "optimizer_read", state_at, per_value * bias, stored)
        add(events, "optimizer_write", state_at, per_value * bias, stored)
        add(events, "optimizer_write", "ddr", bias, weights.nbytes(bias, compensation=False))
        add(events, "weight_update", "vector", bias)
        merge(events, format_events(formats, bias))
    return events


def weight_code_sets(formats: StateFormats, state_at: str, sums: int) -> int:
    """8-bit weight code sets the update writes to DDR, where the GEMMs load them: one, read by
    the forward GEMM and grad_input. int8 weights per channel: the forward GEMM reads the stored
    codes (a copy only where they live in TCM), and grad_input, whose reduction runs along the
    channels their scales cover, gets per-tensor codes of them (`sums` > 1: it exists)."""
    if formats.weights.scales != "row":
        return 1
    return (state_at == "tcm") + (sums > 1)


def format_events(formats: StateFormats, values: int) -> dict:
    """The vector unit's work on `values` weights and their momentum beyond fp32 arithmetic:
    integer codes decoded (times their scales), their groups' peaks found and the new values
    requantized (int8 weights: the requantization of `weight_update`, their codes being the
    GEMMs'), bf16 values rounded (bf16-kahan: the value and its compensation, and Kahan's
    adds), and a random number per value that rounds stochastically."""
    events = {}
    for fmt, weight in ((formats.weights, True), (formats.momentum, False)):
        if fmt.integer:
            add(events, "state_decode", "vector", values)
            if not (weight and fmt.scales == "row"):
                add(events, "state_requant", "vector", values)
        elif fmt.bits < 32:
            add(events, "state_round", "vector", values * (2 if fmt.compensated else 1))
        if fmt.peaked:
            add(events, "state_peak", "vector", values)
        if fmt.compensated:
            add(events, "kahan", "vector", values)
        if fmt.stochastic:
            add(events, "state_rng", "vector", values)
    return events


def check_readable(hw: HWConfig, formats: StateFormats, what: str = "weights") -> None:
    """Refuse stored weight codes the array cannot take: int8 weights are the forward GEMM's
    operand as they are stored."""
    if formats.weights.scales == "row" and hw.array.operand_bits < formats.weights.bits:
        raise ValueError(f"{what} {formats.weights.name}: the forward GEMM reads the stored "
                         f"{formats.weights.bits}-bit codes as they are, and {hw.name}'s MACs "
                         f"take codes of at most {hw.array.operand_bits} bits; pick fp32, bf16 "
                         f"or int16 weights, or a config with wider operands")


def bias_events(m: int, n: int, direction: str) -> dict:
    """A layer's bias over its M x N output: forward, one add per output in the output
    pipeline (bias_add); backward, its gradient, the column sums of dY, gathered by adders
    beside whatever writes or reads dY (bias_grad). Neither moves bytes of its own."""
    events = {}
    add(events, "bias_add" if direction == "forward" else "bias_grad", "array", m * n)
    return events


def state_bytes(params: int, formats: StateFormats = FP32_STATE, channels: int = 1,
                bias: int = 0) -> int:
    """Bytes of a layer's persistent optimizer state in `formats`: `params` weights in
    `channels` rows and `bias` biases, each with its momentum (the scales included)."""
    weights, momentum, block = formats.weights, formats.momentum, formats.block
    total = 0
    if params:
        total += weights.nbytes(params, channels) + momentum.nbytes(params, channels, block)
    if bias:
        total += weights.nbytes(bias) + momentum.nbytes(bias, None, block)
    return total
