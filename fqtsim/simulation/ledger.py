"""The ledger: one row per (gemm, event, level) with count, bytes, energy and cycles.

The emulating `Device` and the closed-form `fqtsim.simulation.cost` both produce raw events
(what happened, where, how many, how many bytes, how many cycles); this module alone prices them
in energy, so the energy table of the hardware model lives in one place.

Events (level):
    mac_AxB (array)      MACs of A-bit by B-bit operands; cycles = compute cycles of the array
    overflow (array)     accumulator / partial-sum add steps that overflowed (emulation only)
    requantize (array)   fused requantization in the output pipeline, one op per output
    load_a, load_b (ddr) operand tiles DDR -> TCM
    read_a, read_b (tcm) operands TCM -> array, once per fold that uses them
    psum_spill (tcm|ddr) accumulator added into its partial sum in TCM, or in DDR where K is not
                         innermost and the waiting sums do not fit (read-modify-write)
    psum_drain (tcm|ddr) final partial sums read out for write-back
    writeback (ddr|tcm)  output written at its stored width (b-bit codes, or full width: see
                         `fqtsim.hardware.mapping.wide_store_bits`)
    stall (ddr|tcm)      cycles the array waits on that memory; sum(cycles) = elapsed cycles
    static (chip)        leakage over the GEMM's elapsed cycles: energy.static_mw x cycles /
                         clock (one row per priced GEMM, count and cycles 0; none when 0 mW)
Quantizer passes (see `fqtsim.simulation.schedule`), at a memory level for their traffic and at `vector`
for their ops (count = elements; ops per element in PASS_OPS):
    wide_write           gradient (or activation) written at full width before its range is known
    range_pass           min/max reduction over the wide gradient: by comparators as the
                         producer writes it (array, `pipeline.range: fused`) or by a vector
                         pass that reads it back (vector and its level)
    sort                 BHQ: bitonic compare network over the row ranges
    transform            BHQ: block Householder and row scaling of the wide rows
    rotate (array|vector) hadamard: the fast Walsh-Hadamard butterflies of R (count: adds) on
                         dY's rows (in the producer's pipeline, or the requantization pass) and
                         on W's columns (in the update, which writes R^T W's codes)
    requant_pass         requantization to b-bit codes (a read pass over the wide tensor)
    code_write (ddr)     b-bit codes written for the GEMM to load
    sr_rng (vector|array) stochastic rounding's random numbers: in the requantization pass, or
                         with delayed ranges in the producer's output pipeline (which requantizes,
                         `requantize`, and writes the codes, `code_write`)
    wide_scale (array)   raw sums scaled to fp32/bf16 as they are written wide
                         (`pipeline.wide_format`)
    clip (array)         delayed ranges: values clipped to the known range (emulation only)
    block_max,           mxint: each block's max |x| in the producer's output pipeline, its
    block_scale (array)  exponent per block
    scale_write (ddr)    mxint: one scale byte per block, beside the codes
    scale_load (ddr),    mxint: A's scale bytes with its tiles (one per block of elements
    scale_read (tcm)     loaded or read)
    block_ref (array)    mxint: each row's least exponent, as A's scale bytes arrive
    block_align (array)  mxint: a block's partial sum shifted and added into the running sum
                         (a shift and an add at accumulator width)
    colsum, rowsum,      rank-1 corrections for affine codes' offsets: B's column sums, A's
    zero_point           row sums, multiply-adds per output
    wide_output          BHQ: the GEMM output written at full width for T^-1 (in place of
                         the write-back)
    inverse_transform    BHQ: T^-1 on the wide output rows, then requantization
    inverse_codes (ddr)  output codes written after the inverse transform
    inverse_rows (array) BHQ gathered (`pipeline.bhq_inverse: gather`): T^-1 on each output tile
                         in the pipeline, A's rows loaded in block order, before the write-back
    col2im (tcm|vector)  a convolution's grad_input: its im2col output folded onto the feature
                         map in TCM at accumulator width (count: the entries that land on an
                         element already stored, each a read-modify-write and one add; the
                         map's own store is its consumer's)
    bias_add (array)     a layer's bias added to each output in the output pipeline
    bias_grad (array)    its gradient: dY's column sums, by adders beside what writes or reads dY
    optimizer_read       SGD with momentum on the stored state: read the weight gradient (where
    optimizer_write      its GEMM left it), the stored weights and momentum; write them back and
    weight_update        the 8-bit weight codes of the next GEMMs (`schedule.update_events`)
    state_decode,        the stored formats' work beyond fp32 (`fqtsim.quantizers.storage`): integer
    state_peak,          codes times their scales; a row's or block's peak before its scale is set;
    state_requant,       a value requantized to an integer code (int16 weights, int8 momentum,
    state_round,         int8 weights' per-tensor codes for grad_input); a value rounded to bf16;
    state_rng, kahan     stochastic rounding's random numbers; Kahan's compensation (three adds)
Embeddings (see `fqtsim.simulation.embedding`; count = elements):
    embed_gather         token ids and their table rows read for the lookup
    embed_scatter        backward: dX read and each element added into its token's and its
                         position's gradient (vector: 2 adds per element)
    embed_grad           those gradient entries, each read and written at full width
Between the GEMMs (see `fqtsim.simulation.between`; count = elements, per channel or row where
said, or compares for maxpool; a memory row's bytes are everything its pass reads there):
    norm_stats           BN/LayerNorm batch statistics: sum and sum of squares (array: beside the
                         producer's write; or a vector pass that reads the tensor)
    bn_channel           BN per channel: mean, variance, 1/sqrt (Newton), scale, shift, running stats
    bn_norm              BN forward pass: y * scale + shift
    bn_grad_sums         BN backward reduction: per-channel sums of dy and dy * y
    bn_grad_channel      BN backward per channel: the coefficients of dx = a dy + b y + c
    bn_grad              BN backward pass: dx = a dy + b y + c
    ln_row, ln_norm      LayerNorm per token (mean, 1/sqrt) and its pass: (x - mean) * rstd * g + b
    ln_grad_sums,        LayerNorm backward: reduction pass (sums per token, dgamma, dbeta),
    ln_grad_row, ln_grad per-token means, and the pass writing dx
    relu, relu_grad      max(x, 0); backward: dy selected by the mask
    relu_mask            the ReLU mask written at 1 bit per element (read back by relu_grad)
    residual_add         residual add: reads the other operand
    residual_grad        the fork's gradients summed: reads the other branch's gradient
    maxpool, pool_index  compares per window (count: compares); argmax per output written
    maxpool_grad         scatter-add of the pooled gradient by its argmax (reads it and the indices)
    avgpool, avgpool_grad  sums per window; backward: dy / window per output, broadcast
    softmax_max          row max (beside the producer's write, or a pass)
    softmax              pass: exp(x - max) (degree-3 polynomial of 2^frac), row sums
    softmax_row, ce_row  per row: 1 / sum (Newton); cross-entropy's log (degree-4) and loss
    softmax_out          pass: exp(x - max) recomputed, times 1 / sum (softmax out, or CE's dlogits)
    softmax_grad_sums,   softmax backward: per-row sum of dP * P, then dS = P (dP - sum)
    softmax_grad
    gelu, gelu_grad      x * sigmoid(1.702 x) (exp and a Newton reciprocal); its derivative times dy
    pass_write           a between op's output (or a saved input) written at its stored width
A pass's vector row carries its vector cycles and its memory rows the time the memory needs
beyond that, so that cycles still sum to elapsed time.
Units: bytes, pJ, cycles of the array clock.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fqtsim.hardware.hw import HWConfig
from fqtsim.hardware.mapping import container_bits, wide_bits

COLUMNS = ["gemm", "event", "level", "count", "bytes", "energy_pj", "cycles"]


@dataclass(frozen=True)
class GemmSpec:
    """What a GEMM's events are priced by beyond the config: its operand widths."""
    a_bits: int
    b_bits: int

    def name(self, event: str) -> str:
        """Ledger name of a raw event: MACs are named by operand widths (mac_4x8)."""
        return f"mac_{self.a_bits}x{self.b_bits}" if event == "mac" else event


# Vector-unit ops per element of each pass, by op kind of the config's vector table.
PASS_OPS = {
    "range_pass": {"minmax": 1},
    "range_predict": {"mul": 4, "add": 4},      # per sample: two log-linear bounds (log2 and
                                                # exp2 by exponent and a mul-add)
    "sort": {"compare": 1},
    "transform": {"mul": 3, "add": 2},          # v^T x, x - 2 v (.), row scale
    "requant_pass": {"requant": 1},
    "sr_rng": {"rng": 1},                       # stochastic rounding's random number
    "colsum": {"add": 1},
    "rowsum": {"add": 1},
    "col2im": {"add": 1},
    "zero_point": {"mul": 1, "add": 1},
    "inverse_transform": {"mul": 3, "add": 2, "requant": 1},
    "inverse_rows": {"mul": 3, "add": 2},       # T^-1 in the pipeline; the write-back requantizes
    "weight_update": {"mul": 3, "add": 3, "requant": 1},   # decay, momentum, step; new codes
    "state_decode": {"mul": 1},                 # an integer code times its scale
    "state_peak": {"minmax": 1},                # per value, its row's or block's peak
    "state_requant": {"requant": 1},
    "state_round": {"add": 1},                  # bf16: half or 16 random bits added, then truncated
    "state_rng": {"rng": 1},
    "kahan": {"add": 3},                        # y = u - c, s - w, (s - w) - y
    "wide_scale": {"mul": 1},                   # raw sums times their scales: fp32/bf16 storage
    "block_max": {"minmax": 1},
    "rotate": {"add": 1},                       # hadamard: per butterfly add of R
    "block_scale": {"add": 1},                  # per block: the exponent of its max
    "block_ref": {"minmax": 1},                 # per row and block of A
    "bias_add": {"add": 1},
    "bias_grad": {"add": 1},
    "embed_scatter": {"add": 1},
    # between the GEMMs (fqtsim.simulation.between, whose docstring counts each)
    "norm_stats": {"add": 2, "mul": 1},         # sum, square, sum of squares
    "bn_channel": {"mul": 18, "add": 11},       # per channel
    "bn_norm": {"mul": 1, "add": 1},
    "bn_grad_sums": {"mul": 1, "add": 2},
    "bn_grad_channel": {"mul": 8, "add": 2},    # per channel
    "bn_grad": {"mul": 2, "add": 2},
    "ln_row": {"mul": 13, "add": 6},            # per token
    "ln_norm": {"mul": 2, "add": 2},
    "ln_grad_sums": {"mul": 4, "add": 5},
    "ln_grad_row": {"mul": 2},                  # per token
    "ln_grad": {"mul": 4, "add": 3},
    "relu": {"minmax": 1},
    "relu_grad": {"minmax": 1},                 # a select by the mask bit: a compare's work
    "residual_add": {"add": 1},
    "residual_grad": {"add": 1},
    "maxpool": {"compare": 1},                  # per compare
    "maxpool_grad": {"add": 1},                 # per pooled output
    "avgpool": {"add": 1},
    "avgpool_grad": {"mul": 1},                 # per pooled output
    "softmax_max": {"minmax": 1},
    "softmax": {"mul": 4, "add": 7},
    "softmax_row": {"mul": 6, "add": 4},        # per row
    "ce_row": {"mul": 6, "add": 9},             # per row
    "softmax_out": {"mul": 5, "add": 6},
    "softmax_grad_sums": {"mul": 1, "add": 1},
    "softmax_grad": {"mul": 1, "add": 1},
    "gelu": {"mul": 9, "add": 9},
    "gelu_grad": {"mul": 12, "add": 11},
}
# Direction of each pass's memory traffic at its level.
PASS_MEMORY = {"col2im": "write", "wide_write": "write", "range_pass": "read", "transform": "read",
               "scale_write": "write",
               "requant_pass": "read", "code_write": "write", "inverse_transform": "read",
               "inverse_codes": "write", "optimizer_read": "read", "optimizer_write": "write"}
# between the GEMMs: each pass reads at its levels; masks, indices and outputs are writes
PASS_MEMORY.update({event: "read" for event in (
    "norm_stats", "bn_norm", "bn_grad_sums", "bn_grad", "ln_norm", "ln_grad_sums", "ln_grad",
    "relu_grad", "residual_add", "residual_grad", "maxpool", "maxpool_grad", "avgpool",
    "avgpool_grad", "softmax_max", "softmax", "softmax_out", "softmax_grad_sums", "softmax_grad",
    "gelu_grad")})
PASS_MEMORY.update({"relu_mask": "write", "pool_index": "write", "pass_write": "write"})
PASS_MEMORY.update({"embed_gather": "read", "embed_scatter": "read", "embed_grad": "write"})


def pass_transfer_pj(hw: HWConfig, level: str, direction: str) -> float:
    """pJ per byte a vector pass moves: at TCM directly; at DDR staged through TCM both ways."""
    tcm, ddr = hw.tcm, hw.ddr
    if level == "ddr":
        return tcm.write_pj_per_byte + tcm.read_pj_per_byte + (
            ddr.read_pj_per_byte if direction == "read" else ddr.write_pj_per_byte)
    return tcm.read_pj_per_byte if direction == "read" else tcm.write_pj_per_byte


def pass_memory_cycles(hw: HWConfig, level: str, direction: str, nbytes: float) -> float:
    if level == "ddr":
        return nbytes / hw.ddr.bytes_per_cycle
    bandwidth = hw.tcm.read_bytes_per_cycle if direction == "read" else hw.tcm.write_bytes_per_cycle
    return nbytes / bandwidth


def vector_cycles(hw: HWConfig, event: str, count: int) -> float:
    ops = PASS_OPS[event]
    return -(-count // hw.vector.lanes) * sum(n * getattr(hw.vector, op).cycles for op, n in ops.items())


def energy_pj(hw: HWConfig, spec: GemmSpec, event: str, level: str, count: float, nbytes: float) -> float:
    """Energy of one ledger row, from the config's tables."""
    tcm, ddr, acc = hw.tcm, hw.ddr, hw.accumulator
    if level in ("vector", "array") and event in PASS_OPS:   # array: in the output pipeline
        return count * sum(n * getattr(hw.vector, op).pj for op, n in PASS_OPS[event].items())
    if event == "col2im":   # each entry read, added to and written back
        written = count * container_bits(wide_bits(hw)) / 8
        return written * tcm.write_pj_per_byte + (nbytes - written) * tcm.read_pj_per_byte
    if event == "embed_grad":   # half of its bytes read, half written back
        return nbytes / 2 * (pass_transfer_pj(hw, level, "read") + pass_transfer_pj(hw, level, "write"))
    if event in PASS_MEMORY:
        return nbytes * pass_transfer_pj(hw, level, PASS_MEMORY[event])
    if event == "mac":
        return count * hw.energy.mac_pj(spec.a_bits, spec.b_bits, acc.bits)
    if event in ("load_a", "load_b"):   # into the operand's buffer (its own, partitioned)
        return nbytes * (ddr.read_pj_per_byte + tcm.pj_per_byte("write", event[-1]))
    if event == "scale_load":   # A's scale bytes, into A's buffer
        return nbytes * (ddr.read_pj_per_byte + tcm.pj_per_byte("write", "a"))
    if event == "scale_read":
        return nbytes * tcm.pj_per_byte("read", "a")
    if event == "block_align":   # a barrel shift and an add, both accumulator-wide
        return count * 2 * hw.energy.add_pj(acc.bits)
    if event == "psum_drain":
        return nbytes * (ddr if level == "ddr" else tcm).read_pj_per_byte
    if event in ("read_a", "read_b"):
        return nbytes * tcm.pj_per_byte("read", event[-1])
    if event == "psum_spill":  # every spill writes its partial sum; all but each output's first read it
        written = count * container_bits(wide_bits(hw)) / 8
        memory = ddr if level == "ddr" else tcm
        return (count * hw.energy.add_pj(acc.psum_bits) + written * memory.write_pj_per_byte
                + (nbytes - written) * memory.read_pj_per_byte)
    if event in ("writeback", "wide_output"):   # to DDR: staged through the TCM output tile
        return nbytes * pass_transfer_pj(hw, level, "write")
    if event == "requantize":
        return count * hw.vector.requant.pj
    if event in ("stall", "overflow", "clip"):
        return 0.0
    raise KeyError(f"no energy rule for event {event!r}")


def frame(rows: list) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def price(hw: HWConfig, gemm: str, spec: GemmSpec, events: dict) -> list[tuple]:
    """Price raw events {(event, level): [count, bytes, cycles]} into ledger rows."""
    vector = {ev: vector_cycles(hw, ev, c) for (ev, lvl), (c, b, cy) in events.items()
              if lvl == "vector"}
    rows = []
    for (ev, lvl), (c, b, cy) in sorted(events.items(), key=event_order):
        if lvl == "vector":
            cy = vector[ev]
        elif ev in PASS_MEMORY:  # a pass takes the longer of its vector and memory time
            cy = max(0.0, pass_memory_cycles(hw, lvl, PASS_MEMORY[ev], b) - vector.get(ev, 0.0))
        rows.append((gemm, spec.name(ev), lvl, int(c), float(b),
                     energy_pj(hw, spec, ev, lvl, c, b), float(cy)))
    if hw.energy.static_mw > 0:   # leakage over the GEMM's elapsed time: what its rows' cycles sum to
        rows.append((gemm, "static", "chip", 0, 0.0, static_pj(hw, sum(r[6] for r in rows)), 0.0))
    return rows


def static_pj(hw: HWConfig, cycles: float) -> float:
    """Leakage over `cycles` of the array clock: mW x cycles / MHz is nJ (1e3 pJ)."""
    return hw.energy.static_mw * cycles / hw.array.clock_mhz * 1e3


EVENTS = ("wide_write", "range_pass", "range_predict", "sort", "transform", "rotate", "requant_pass",
          "code_write",
          "sr_rng", "clip", "block_max", "block_scale", "scale_write", "mac", "overflow",
          "requantize", "load_a", "load_b", "scale_load", "read_a", "read_b", "scale_read",
          "block_ref", "block_align", "psum_spill", "psum_drain", "colsum", "rowsum", "zero_point", "col2im",
          "wide_scale", "writeback", "wide_output", "inverse_transform", "inverse_rows",
          "inverse_codes", "bias_add", "bias_grad", "optimizer_read", "optimizer_write",
          "weight_update", "state_decode", "state_peak", "state_requant", "state_round",
          "state_rng", "kahan", "embed_gather", "embed_scatter", "embed_grad",
          # between the GEMMs
          "norm_stats", "bn_channel", "bn_norm", "bn_grad_sums", "bn_grad_channel", "bn_grad",
          "ln_row", "ln_norm", "ln_grad_sums", "ln_grad_row", "ln_grad", "relu", "relu_mask",
          "relu_grad", "residual_add", "residual_grad", "maxpool", "pool_index", "maxpool_grad",
          "avgpool", "avgpool_grad", "softmax_max", "softmax", "softmax_row", "ce_row",
          "softmax_out", "softmax_grad_sums", "softmax_grad", "gelu", "gelu_grad", "pass_write",
          "stall", "static")


def event_order(item):
    """The order of a raw event's rows in a ledger: by EVENTS, then by level."""
    (event, level), _ = item
    return EVENTS.index(event), level


def add(events: dict, event: str, level: str, count=0, nbytes=0.0, cycles=0.0):
    """Accumulate into a raw-event dict."""
    row = events.setdefault((event, level), [0, 0.0, 0.0])
    row[0] += count
    row[1] += nbytes
    row[2] += cycles


def merge(events: dict, more: dict):
    """Add the raw events of `more` into `events`."""
    for (event, level), (count, nbytes, cycles) in more.items():
        add(events, event, level, count, nbytes, cycles)


def summarize(ledger: pd.DataFrame) -> pd.DataFrame:
    """Per GEMM: bytes by memory level, MACs, energy and elapsed cycles."""
    moved = ledger[ledger.level.isin(["tcm", "ddr"]) & (ledger.event != "stall")]
    out = moved.pivot_table(index="gemm", columns="level", values="bytes", aggfunc="sum",
                            fill_value=0.0, sort=False).add_suffix("_bytes")
    macs = ledger[ledger.event.str.startswith("mac_")].groupby("gemm", sort=False)["count"].sum().rename("macs")
    totals = ledger.groupby("gemm", sort=False)[["energy_pj", "cycles"]].sum()
    out = pd.concat([out, macs, totals], axis=1)
    ovf = ledger[ledger.event == "overflow"].groupby("gemm", sort=False)["count"].sum()
    if len(ovf):
        out["overflows"] = ovf
    out.columns.name = None
    return out.reset_index()
