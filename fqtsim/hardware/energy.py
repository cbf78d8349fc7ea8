"""Published energy figures per technology node: the one table the hardware configs draw on.

A config names its node (`technology: 45nm` or `7nm`) and leaves any energy figure null to take it
from here (`fqtsim.hardware.hw.load_hw` fills them in); a figure it states explicitly is kept.
Each node holds one source's numbers, so logic, SRAM and DRAM of a config come from one node:

- 45nm: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
  45 nm at 0.9 V (the table of its Figure 1.1.9).
- 7nm: N. P. Jouppi et al., "Ten Lessons From Three Generations Shaped Google's TPUv4i",
  ISCA 2021, Table 2 (45 nm against 7 nm; the 45 nm column is Horowitz's). Its ratios: adders
  2.4-4.3x, multipliers 2.1-3.2x cheaper at 7 nm, small SRAMs only 1.3-2.4x, DDR DRAM not at
  all (DRAM energy is the DRAM's, not the logic node's).

Units: pJ per operation; SRAM points in pJ per 64-bit access (as both sources give them) at a
capacity in KiB; DRAM in pJ per byte. Derived figures (the rules below) are fqtsim's, not the
sources': SRAM energy between published capacities, vector-unit ops built from the table's adds
and multiplies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """One technology node's published energies."""
    name: str
    source: str
    int_add_pj: tuple          # ((bits, pJ), ...) integer adds
    int_mult_pj: tuple         # ((bits, pJ), ...) integer multiplies
    float_pj: tuple            # ((op, pJ), ...) floating-point ops, for reference
    sram_pj_per_access: tuple  # ((capacity KiB, pJ per 64-bit access), ...), ascending capacity
    dram_pj_per_access: tuple  # ((kind, pJ per 64-bit access), ...), the first is the default

    def add_pj(self, bits: int) -> float:
        return dict(self.int_add_pj)[bits]

    def mult_pj(self, bits: int) -> float:
        return dict(self.int_mult_pj)[bits]

    @property
    def dram_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.dram_pj_per_access)


HOROWITZ = "Horowitz, ISSCC 2014 (45 nm, 0.9 V)"
JOUPPI = "Jouppi et al., ISCA 2021, Table 2 (7 nm)"

NODES = {
    "45nm": Node(
        "45nm", HOROWITZ,
        int_add_pj=((8, 0.03), (16, 0.05), (32, 0.1)),
        int_mult_pj=((8, 0.2), (32, 3.1)),
        float_pj=(("fp16_add", 0.4), ("fp32_add", 0.9), ("fp16_mult", 1.1), ("fp32_mult", 3.7)),
        sram_pj_per_access=((8, 10.0), (32, 20.0), (1024, 100.0)),
        # 1.3-2.6 nJ per 64-bit DRAM access: the low end, which Jouppi et al. list for DDR3/4
        dram_pj_per_access=(("ddr", 1300.0),),
    ),
    "7nm": Node(
        "7nm", JOUPPI,
        int_add_pj=((8, 0.007), (32, 0.03)),
        int_mult_pj=((8, 0.07), (32, 1.48)),
        float_pj=(("bf16_add", 0.11), ("fp16_add", 0.16), ("fp32_add", 0.38),
                  ("bf16_mult", 0.21), ("fp16_mult", 0.34), ("fp32_mult", 1.31)),
        sram_pj_per_access=((8, 7.5), (32, 8.5), (1024, 14.0)),
        # DDR3/4 1.3 nJ (unchanged from 45 nm); HBM2 250-450 pJ and GDDR6 350-480 pJ: mid-range
        dram_pj_per_access=(("ddr", 1300.0), ("hbm2", 350.0), ("gddr6", 415.0)),
    ),
}
TECHNOLOGIES = tuple(NODES)
ACCESS_BYTES = 8   # both sources price a 64-bit access

# Vector-unit ops from the node's 32-bit integer figures (the vector lanes are 32 bits wide):
# (32-bit adds, 32-bit multiplies, 8-bit adds) per element
VECTOR_RULES = {
    "minmax": (1, 0, 0),    # one compare, an adder's work
    "add": (1, 0, 0),
    "mul": (0, 1, 0),
    "compare": (1, 0, 0),   # one step of the sort network
    "rng": (0, 0, 6),       # xorshift32: 3 shifts + 3 xors, each an 8-bit-add-class op per byte lane
    "requant": (2, 1, 0),   # fixed-point rescale: a multiply, an add, a shift-and-clip
}


# Leakage: no published figure for edge NPUs of these classes; fqtsim's estimate is this share
# of the chip's peak on-chip dynamic power (`fqtsim.hardware.hw.peak_dynamic_mw`), the order of
# leakage in a low-power process. A config may state its own static_mw instead.
LEAKAGE_SHARE = 0.10


def node(technology: str) -> Node:
    """The table of `technology` ('45nm' or '7nm'); anything else is a ValueError naming them."""
    try:
        return NODES[technology]
    except (KeyError, TypeError):
        raise ValueError(f"technology: got {technology!r}; expected one of "
                         f"{', '.join(TECHNOLOGIES)}") from None


def sram_pj_per_byte(technology: str, capacity_kib: float) -> float:
    """pJ per byte of an access to an SRAM of `capacity_kib`, log-log interpolated between the
    node's published capacities (and extended past the smallest and the largest along the
    nearest segment: access energy grows as a power of capacity, wires and bit lines growing
    with the array)."""
    if not (isinstance(capacity_kib, (int, float)) and 0 < capacity_kib < math.inf):
        raise ValueError(f"capacity_kib: got {capacity_kib!r}; expected a finite number > 0")
    points = node(technology).sram_pj_per_access
    i = next((j for j in range(1, len(points) - 1) if capacity_kib < points[j][0]), len(points) - 1)
    (c0, e0), (c1, e1) = points[i - 1], points[i]
    slope = math.log(e1 / e0) / math.log(c1 / c0)
    return e0 * (capacity_kib / c0) ** slope / ACCESS_BYTES


def dram_pj_per_byte(technology: str, kind: str | None = None) -> float:
    """pJ per byte of DRAM of `kind` (None: the node's first, DDR) in `technology`'s table."""
    table = node(technology)
    kinds = dict(table.dram_pj_per_access)
    kind = table.dram_kinds[0] if kind is None else kind
    if kind not in kinds:
        raise ValueError(f"ddr.kind: got {kind!r}; the {technology} table lists "
                         f"{', '.join(table.dram_kinds)}")
    return kinds[kind] / ACCESS_BYTES


def mac_figures(technology: str) -> tuple[float, float]:
    """(8x8-bit multiply, 32-bit add) in pJ: what a MAC's energy is scaled from."""
    table = node(technology)
    return table.mult_pj(8), table.add_pj(32)


def vector_pj(technology: str, op: str) -> float:
    """pJ per element of vector op `op` (a key of VECTOR_RULES), built from the node's adds and
    multiplies by VECTOR_RULES."""
    table = node(technology)
    adds, mults, small_adds = VECTOR_RULES[op]
    return adds * table.add_pj(32) + mults * table.mult_pj(32) + small_adds * table.add_pj(8)
