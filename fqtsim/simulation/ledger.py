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
    writeback (ddr|tcm)  output written at its stored width (b-bit codes, or accumulator width)
    stall (ddr|tcm)      cycles the array waits on that memory; sum(cycles) = elapsed cycles
Quantizer passes (see `fqtsim.simulation.schedule`), at a memory level for their traffic and at `vector`
for their ops (count = elements; ops per element in PASS_OPS):
    wide_write           gradient written at accumulator width before its range is known
    range_pass           min/max reduction over the wide gradient
    sort                 BHQ: bitonic compare network over the row ranges
    transform            BHQ: block Householder and row scaling of the wide rows
    requant_pass         stochastic rounding to b-bit codes
    code_write (ddr)     b-bit codes written for the GEMM to load
    sr_rng (array)       delayed ranges: random numbers drawn in the producer's output pipeline
    clip (array)         delayed ranges: values clipped to the known range (emulation only)
    colsum, rowsum,      rank-1 corrections for affine codes' offsets: B's column sums, A's
    zero_point           row sums, multiply-adds per output
    wide_output          BHQ: the GEMM output written at accumulator width for T^-1 (in place of
                         the write-back)
    inverse_transform    BHQ: T^-1 on the wide output rows, then requantization
    inverse_codes (ddr)  output codes written after the inverse transform
    col2im (tcm|vector)  a convolution's grad_input: its im2col output folded onto the feature
                         map in TCM at accumulator width (count: entries written; the bytes
                         include the read of each one that adds to an earlier), one add each
    optimizer_read       SGD with momentum on FP32 masters: read the weight gradient (where its
    optimizer_write      GEMM left it), master weights and momentum; write masters, momentum and
    weight_update        the 8-bit weight codes of the next forward pass
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
    "sort": {"compare": 1},
    "transform": {"mul": 3, "add": 2},          # v^T x, x - 2 v (.), row scale
    "requant_pass": {"rng": 1, "requant": 1},
    "colsum": {"add": 1},
    "rowsum": {"add": 1},
    "col2im": {"add": 1},
    "zero_point": {"mul": 1, "add": 1},
    "inverse_transform": {"mul": 3, "add": 2, "requant": 1},
    "weight_update": {"mul": 3, "add": 3, "requant": 1},   # decay, momentum, step; new codes
}
# Direction of each pass's memory traffic at its level.
PASS_MEMORY = {"col2im": "write", "wide_write": "write", "range_pass": "read", "transform": "read",
               "requant_pass": "read", "code_write": "write", "inverse_transform": "read",
               "inverse_codes": "write", "optimizer_read": "read", "optimizer_write": "write"}


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
    if level == "vector":
        return count * sum(n * getattr(hw.vector, op).pj for op, n in PASS_OPS[event].items())
    if event == "col2im":   # entries written; the rest of the bytes read back to add to
        written = count * container_bits(wide_bits(hw)) / 8
        return written * tcm.write_pj_per_byte + (nbytes - written) * tcm.read_pj_per_byte
    if event in PASS_MEMORY:
        return nbytes * pass_transfer_pj(hw, level, PASS_MEMORY[event])
    if event == "sr_rng":
        return count * hw.vector.rng.pj
    if event == "mac":
        return count * hw.energy.mac_pj(spec.a_bits, spec.b_bits, acc.bits)
    if event in ("load_a", "load_b"):
        return nbytes * (ddr.read_pj_per_byte + tcm.write_pj_per_byte)
    if event == "psum_drain":
        return nbytes * (ddr if level == "ddr" else tcm).read_pj_per_byte
    if event in ("read_a", "read_b"):
        return nbytes * tcm.read_pj_per_byte
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
    for (ev, lvl), (c, b, cy) in sorted(events.items(), key=_order):
        if lvl == "vector":
            cy = vector[ev]
        elif ev in PASS_MEMORY:  # a pass takes the longer of its vector and memory time
            cy = max(0.0, pass_memory_cycles(hw, lvl, PASS_MEMORY[ev], b) - vector.get(ev, 0.0))
        rows.append((gemm, spec.name(ev), lvl, int(c), float(b),
                     energy_pj(hw, spec, ev, lvl, c, b), float(cy)))
    return rows


EVENTS = ("wide_write", "range_pass", "sort", "transform", "requant_pass", "code_write",
          "sr_rng", "clip", "mac", "overflow", "requantize", "load_a", "load_b", "read_a",
          "read_b", "psum_spill", "psum_drain", "colsum", "rowsum", "zero_point", "col2im", "writeback",
          "wide_output", "inverse_transform", "inverse_codes", "optimizer_read", "optimizer_write",
          "weight_update", "stall")


def _order(item):
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
