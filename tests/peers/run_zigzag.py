#!/usr/bin/env python
"""Cross-check fqtsim's GEMM and conv DRAM traffic against ZigZag (zigzag-dse 3.9.1).

Not a pytest module (the name does not start with ``test_``).  Run it with the
interpreter that has ZigZag installed, e.g.::

    /tmp/zz/bin/python tests/peers/run_zigzag.py 128x784x512 200x300x100
    /tmp/zz/bin/python tests/peers/run_zigzag.py --check           # reference rows (GEMM and conv)
    /tmp/zz/bin/python tests/peers/run_zigzag.py -o out.csv --nodb 64x64x64
    /tmp/zz/bin/python tests/peers/run_zigzag.py c64x58x58k64r3s1 r18c2_nopad56 c256x14x14k256r3s1

Shapes:

* GEMM ``MxKxN`` (an optional leading ``g`` is accepted) for C[M,N] = A[M,K] @ B[K,N].
* Conv ``c<C>x<H>x<W>k<K>r<R>s<S>``: batch 1, C x H x W input (given as data, i.e. any
  padding is already in H and W; ZigZag is told padding 0), K output channels, an R x R
  kernel, stride S; output OH = (H - R) // S + 1, OW = (W - R) // S + 1.  ``r18c2_pad58``
  (= c64x58x58k64r3s1) and ``r18c2_nopad56`` (= c64x56x56k64r3s1) are accepted as names.
  As a GEMM: M = OH * OW output positions, K = C * R * R, N = K output channels.

The accelerator is the reference array of shared/peers/README.md:

* 16 x 16 int8 MAC array, output stationary: spatial D1 = M 16, D2 = N 16;
  one 32-bit accumulator register per PE holds the output across all of K,
  so outputs leave the array once, as 8-bit values (O_final = 8).
* SRAMs: ifmap (A, ZigZag operand I / memory operand I1) 64 KiB,
  filter (B, W / I2) 64 KiB, ofmap (C, O) 32 KiB, each with
  ``force_double_buffering`` (variant os_fixed; --nodb gives os_fixed_nodb).
* DRAM: 16 bytes/cycle = 128 bits/cycle, one read/write port.
* Fixed temporal mapping ``os_fixed``: K innermost (whole), then M/16 row
  folds, then N/16 column folds outermost.
* Details the README does not fix, chosen so the reference *cycles* come out
  exactly too (they do not change any DRAM count): one int8 A and one int8 B
  register per PE, both array dimensions systolic (15 + 15 drain cycles),
  A/B SRAM ports 16 B/cycle, ofmap SRAM ports 64 B/cycle.

Conv mapping (os_fixed for a conv; reproduces the shared r18c2_pad58 and r18c2_nopad56
ZigZag os_fixed rows exactly, cycles included):

* Workload ``O[b][k][oy][ox] += W[k][c][fy][fx] * I[b][c][iy][ix]`` with
  ix = S*ox + fx, iy = S*oy + fy, IX = W, IY = H, padding 0.
* Spatial: D1 = OX ux x OY uy with ux = gcd(16, OW) (so the OX unrolling always divides
  OW) and uy = min(16 // ux, OH); D2 = K min(16, K).  ZigZag makes an unrolling that does
  not divide its dimension fractional (e.g. OY 54 over uy 8 -> 7 folds of 7.714).
* Temporal, innermost first: C, FX, FY (the whole reduction inside a fold), then
  OX folds OW / ux, then OY folds ceil(OH / uy) (row folds: M = oy*OW + ox, ox fastest),
  then K folds ceil(K / 16) outermost.
* Conv DRAM counts are ZigZag's per-level element move counts (``data_elem_move_count``,
  MACs / reuse below the DRAM, rounded), which is what gives the reference 186624
  ofmap writes for r18c2_nopad56; the GEMM path keeps period amount x period count
  (identical on every reference GEMM).  ``-v`` shows both and the tile ZigZag chose.

All ZigZag input files (accelerator, workload, mapping YAML) are written by
this script into a temporary directory.  Output: CSV with columns
shape,variant,cycles,dram_ifmap_rd,dram_filter_rd,dram_ofmap_wr (GEMM) or
shape,variant,c,h,w,k,r,stride,out_h,out_w,cycles,dram_ifmap_rd,dram_filter_rd,dram_ofmap_wr
(conv); elements = bytes, everything is int8.  Printed to stdout and optionally written
to -o (GEMM and conv shapes cannot share one -o file).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import re
import sys
import tempfile
from importlib import metadata

import yaml

ARRAY = 16  # PE rows = PE columns
DRAM_BW_BITS = 16 * 8  # 16 bytes / cycle
SRAM_A_BITS = 64 * 1024 * 8
SRAM_B_BITS = 64 * 1024 * 8
SRAM_C_BITS = 32 * 1024 * 8

# ZigZag 3.9.1 "os_fixed" rows of shared/peers/reference_results.csv
# (shape -> cycles, dram_ifmap_rd, dram_filter_rd, dram_ofmap_wr).
REFERENCE = {
    "128x784x512": (229139, 3211264, 401408, 65536),
    "512x512x512": (556579, 8388608, 262144, 262144),
    "4096x576x64": (607971, 9437184, 36864, 262144),
}

COLUMNS = ["shape", "variant", "cycles", "dram_ifmap_rd", "dram_filter_rd", "dram_ofmap_wr"]

# Conv rows of the same file: name -> (canonical shape, (cycles, dram_ifmap_rd, dram_filter_rd, dram_ofmap_wr)).
CONV_ALIASES = {"r18c2_pad58": "c64x58x58k64r3s1", "r18c2_nopad56": "c64x56x56k64r3s1"}
CONV_REFERENCE = {
    "c64x58x58k64r3s1": (452659, 1662976, 36864, 200704),
    "c64x56x56k64r3s1": (437885, 903168, 36864, 186624),
}
CONV_COLUMNS = ["shape", "variant", "c", "h", "w", "k", "r", "stride", "out_h", "out_w"] + COLUMNS[2:]
CONV_RE = re.compile(r"^c(\d+)x(\d+)x(\d+)k(\d+)r(\d+)s(\d+)$")


# --------------------------------------------------------------------------- inputs
def _port(name: str, kind: str, bw: int, alloc: list[str]) -> dict:
    return {"name": name, "type": kind, "bandwidth_min": bw, "bandwidth_max": bw, "allocation": alloc}


def _sram(size_bits: int, operand: str, ports: list[dict], double_buffer: bool) -> dict:
    """One of the three on-chip SRAMs, serving the whole array."""
    return {"size": size_bits, "r_cost": 10.0, "w_cost": 12.0, "area": 0, "latency": 1,
            "operands": [operand], "ports": ports, "served_dimensions": ["D1", "D2"],
            "force_double_buffering": double_buffer}


def accelerator_description(double_buffer: bool) -> dict:
    """Reference array as a ZigZag accelerator (dict, dumped to YAML)."""
    sram_bw = ARRAY * 8  # one 16-wide int8 vector per cycle into the array edge
    ofmap_bw = 4 * ARRAY * 8  # ofmap SRAM port: 64 B/cycle (a 16x16 int8 output tile drains in 4 cycles)
    memories = {
        # one int8 operand register per PE for A (moves along the rows) and B (moves down the columns)
        "pe_reg_a": {
            "size": 8,
            "r_cost": 0.01,
            "w_cost": 0.01,
            "area": 0,
            "latency": 1,
            "operands": ["I1"],
            "ports": [_port("r_port_1", "read", 8, ["I1, tl"]), _port("w_port_1", "write", 8, ["I1, fh"])],
            "served_dimensions": [],
        },
        "pe_reg_b": {
            "size": 8,
            "r_cost": 0.01,
            "w_cost": 0.01,
            "area": 0,
            "latency": 1,
            "operands": ["I2"],
            "ports": [_port("r_port_1", "read", 8, ["I2, tl"]), _port("w_port_1", "write", 8, ["I2, fh"])],
            "served_dimensions": [],
        },
        # one 32-bit accumulator per PE, unshared (output stationary)
        "pe_acc": {
            "size": 32,
            "r_cost": 0.05,
            "w_cost": 0.05,
            "area": 0,
            "latency": 1,
            "operands": ["O"],
            "ports": [
                _port("r_port_1", "read", 32, ["O, tl"]),
                _port("r_port_2", "read", 32, ["O, th"]),
                _port("w_port_1", "write", 32, ["O, fl"]),
                _port("w_port_2", "write", 32, ["O, fh"]),
            ],
            "served_dimensions": [],
        },
        "sram_ifmap": _sram(SRAM_A_BITS, "I1", [_port("r_port_1", "read", sram_bw, ["I1, tl"]),
                                                 _port("w_port_1", "write", sram_bw, ["I1, fh"])],
                            double_buffer),
        "sram_filter": _sram(SRAM_B_BITS, "I2", [_port("r_port_1", "read", sram_bw, ["I2, tl"]),
                                                  _port("w_port_1", "write", sram_bw, ["I2, fh"])],
                             double_buffer),
        "sram_ofmap": _sram(SRAM_C_BITS, "O", [
            _port("r_port_1", "read", ofmap_bw, ["O, th"]),
            _port("w_port_1", "write", ofmap_bw, ["O, fl"]),
            # psum read-back / refill paths (unused when K is whole inside the PE)
            _port("r_port_2", "read", ofmap_bw, ["O, tl"]),
            _port("w_port_2", "write", ofmap_bw, ["O, fh"]),
        ], double_buffer),
        "dram": {
            "size": 1 << 40,
            "r_cost": 1000.0,
            "w_cost": 1000.0,
            "area": 0,
            "latency": 1,
            "operands": ["I1", "I2", "O"],
            "ports": [
                _port(
                    "rw_port_1",
                    "read_write",
                    DRAM_BW_BITS,
                    ["I1, tl", "I2, tl", "O, fl", "O, tl", "I1, fh", "I2, fh", "O, fh", "O, th"],
                ),
            ],
            "served_dimensions": ["D1", "D2"],
        },
    }
    return {
        "name": "fqtsim_reference_16x16_os",
        "memories": memories,
        "operational_array": {
            "input_precision": [8, 8],
            "unit_energy": 0.04,
            "unit_area": 1,
            "dimensions": ["D1", "D2"],
            "sizes": [ARRAY, ARRAY],
            # skewed output-stationary array: A moves along D2, B along D1 -> fill/drain of 15 + 15 cycles
            "systolic_dimensions": ["D1", "D2"],
        },
    }


def workload_description(m: int, k: int, n: int) -> list[dict]:
    """C[M,N] = A[M,K] @ B[K,N]; ZigZag operand I = A, W = B, O = C."""
    return [
        {
            "id": 0,
            "name": f"g{m}x{k}x{n}",
            "operator_type": "Gemm",
            "equation": "O[m][n]+=I[m][k]*W[k][n]",
            "loop_dims": ["M", "K", "N"],
            "loop_sizes": [m, k, n],
            # O = 32-bit partial sums, O_final = 8-bit outputs
            "operand_precision": {"I": 8, "W": 8, "O": 32, "O_final": 8},
            "operand_source": {"I": 0, "W": 0},
        }
    ]


def mapping_description(m: int, k: int, n: int) -> list[dict]:
    """os_fixed: spatial M16 x N16; temporal K (whole) innermost, M folds, N folds outermost."""
    m_folds = math.ceil(m / ARRAY) if m > ARRAY else 1
    n_folds = math.ceil(n / ARRAY) if n > ARRAY else 1
    ordering = [["K", k], ["M", m_folds], ["N", n_folds]]  # innermost first
    ordering = [loop for loop in ordering if loop[1] > 1] or [["K", 1]]
    return [
        {
            "name": "default",
            "spatial_mapping": {"D1": [f"M, {ARRAY}"], "D2": [f"N, {ARRAY}"]},
            "temporal_ordering": ordering,
            "memory_operand_links": {"O": "O", "W": "I2", "I": "I1"},
        },
        {
            "name": "Gemm",
            "spatial_mapping": {"D1": [f"M, {ARRAY}"], "D2": [f"N, {ARRAY}"]},
            "temporal_ordering": ordering,
            "memory_operand_links": {"O": "O", "W": "I2", "I": "I1"},
        },
    ]


# --------------------------------------------------------------------------- conv inputs
class Conv:
    """Batch-1 conv, no padding (any padding is already in h and w): c x h x w -> k x out_h x out_w."""

    def __init__(self, c: int, h: int, w: int, k: int, r: int, s: int):
        if min(c, h, w, k, r, s) < 1 or r > h or r > w:
            raise argparse.ArgumentTypeError(f"bad conv c{c}x{h}x{w}k{k}r{r}s{s}")
        self.c, self.h, self.w, self.k, self.r, self.s = c, h, w, k, r, s
        self.out_h = (h - r) // s + 1
        self.out_w = (w - r) // s + 1

    @property
    def name(self) -> str:
        return f"c{self.c}x{self.h}x{self.w}k{self.k}r{self.r}s{self.s}"

    def unrolling(self) -> tuple[int, int, int]:
        """(ux, uy, uk): D1 = OX ux x OY uy, D2 = K uk (see the module docstring)."""
        ux = math.gcd(ARRAY, self.out_w)
        uy = min(ARRAY // ux, self.out_h)
        return ux, uy, min(ARRAY, self.k)


def conv_workload_description(cv: Conv) -> list[dict]:
    """ZigZag conv layer; operand I = ifmap (A), W = filter (B), O = ofmap (C)."""
    return [
        {
            "id": 0,
            "name": cv.name,
            "operator_type": "Conv",
            "equation": "O[b][k][oy][ox]+=W[k][c][fy][fx]*I[b][c][iy][ix]",
            "dimension_relations": [f"ix={cv.s}*ox+1*fx", f"iy={cv.s}*oy+1*fy"],
            "loop_dims": ["B", "K", "OX", "OY", "C", "FX", "FY"],
            "loop_sizes": [1, cv.k, cv.out_w, cv.out_h, cv.c, cv.r, cv.r],
            "operand_precision": {"I": 8, "W": 8, "O": 32, "O_final": 8},
            "operand_source": {"I": 0, "W": 0},
            "pr_loop_dims": ["IX", "IY"],
            "pr_loop_sizes": [cv.w, cv.h],
            "padding": [[0, 0], [0, 0]],
        }
    ]


def conv_mapping_description(cv: Conv) -> list[dict]:
    """os_fixed for a conv: D1 = OX ux x OY uy, D2 = K 16; temporal C, FX, FY, OX folds, OY folds, K folds."""
    ux, uy, uk = cv.unrolling()
    d1 = [f"OX, {ux}"] + ([f"OY, {uy}"] if uy > 1 else [])
    ordering = [
        ["C", cv.c],
        ["FX", cv.r],
        ["FY", cv.r],
        ["OX", cv.out_w // ux],
        ["OY", math.ceil(cv.out_h / uy)],
        ["K", math.ceil(cv.k / uk)],
    ]  # innermost first
    ordering = [loop for loop in ordering if loop[1] > 1]
    if not ordering:  # ZigZag 3.9.1 fails on a layer without temporal loops (and on a lone size-1 loop)
        raise ValueError(f"{cv.name}: a single fold with C*R*R = 1 has no temporal loop; ZigZag cannot run it")
    entry = {
        "spatial_mapping": {"D1": d1, "D2": [f"K, {uk}"]},
        "temporal_ordering": ordering,
        "memory_operand_links": {"O": "O", "W": "I2", "I": "I1"},
    }
    return [{"name": "default", **entry}, {"name": "Conv", **entry}]


def conv_ifmap_rule(cv: Conv, double_buffer: bool = True) -> dict:
    """ZigZag's dram_ifmap_rd for this mapping, recomputed without ZigZag (see ZigZag's MemoryAllocator,
    LayerNode.calc_tensor_dim and Mapping.calc_data_access).

    The ifmap SRAM keeps a prefix (innermost first, whole loops, never split) of the temporal loops
    C, FX, FY, OX folds, OY folds, K folds: of the prefixes whose footprint fits (footprint = C_in x IY x IX
    elements, x2 under double buffering unless it is already the whole used input), the one with the
    least footprint x product(loops above), the longest on a tie; in practice the longest that fits.  Per spatial axis,
    with o = int(spatial unrolling x temporal folds in the tile) output positions (int() truncates a
    fractional unrolling: OY 54 over 7 folds -> 7.714 -> 7) and f = R if the kernel loop is in the tile
    else 1:  I = o*f - max(0, f - S) * (o - 1)   (= S*(o-1) + R for R >= S, o for a 1x1 kernel),
    capped at H or W.  Each tile is fetched once per iteration of the loops above it, K folds included,
    with no reuse of overlapping (halo) rows or columns between neighbouring tiles:
    dram_ifmap_rd = tile x product(loops above the tile).
    """
    ux, uy, uk = cv.unrolling()
    tx, ty, tk = cv.out_w // ux, math.ceil(cv.out_h / uy), math.ceil(cv.k / uk)
    uy_frac = cv.out_h / ty
    loops = [(d, n) for d, n in [("C", cv.c), ("FX", cv.r), ("FY", cv.r), ("OX", tx), ("OY", ty), ("K", tk)] if n > 1]

    def axis(o: int, f: int, cap: int) -> int:
        return min(cap, o * f - max(0, f - cv.s) * (o - 1))

    def footprint(inner: list[tuple[str, int]]) -> int:
        dims = dict(inner)
        ox = int(ux * dims.get("OX", 1))
        oy = int(uy_frac * dims.get("OY", 1))
        return dims.get("C", 1) * axis(oy, dims.get("FY", 1), cv.h) * axis(ox, dims.get("FX", 1), cv.w)

    whole = footprint(loops)
    n_in, best = 0, math.inf
    for i in range(len(loops) + 1):
        size = footprint(loops[:i])
        if double_buffer and i < len(loops) and size < whole:
            size *= 2
        if size * 8 > SRAM_A_BITS:
            break
        cost = size * math.prod(n for _, n in loops[i:])  # ZigZag compares the (doubled) size x fetches
        if cost <= best:
            n_in, best = i, cost
    tile = footprint(loops[:n_in])
    above = math.prod(n for _, n in loops[n_in:])
    return {"tile_loops": [d for d, _ in loops[:n_in]], "tile": tile, "above": above, "dram_ifmap_rd": tile * above}


# --------------------------------------------------------------------------- run
def parse_shape(text: str) -> tuple[int, int, int]:
    t = text.strip().lstrip("g")
    parts = t.split("x")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def parse_any_shape(text: str) -> tuple[int, int, int] | Conv:
    """A GEMM MxKxN, a conv c<C>x<H>x<W>k<K>r<R>s<S>, or a conv name of CONV_ALIASES."""
    t = CONV_ALIASES.get(text.strip(), text.strip())
    mo = CONV_RE.match(t)
    if mo:
        return Conv(*(int(g) for g in mo.groups()))
    if t.startswith("c") or t.startswith("r"):
        raise argparse.ArgumentTypeError(f"conv shape must be c<C>x<H>x<W>k<K>r<R>s<S>, got {text!r}")
    return parse_shape(t)


def _dram_traffic(cme, move_count: bool = False) -> dict[str, int]:
    """Elements moved across the DRAM <-> SRAM boundary, per operand, from ZigZag's data-movement record.

    Default (GEMM path): ZigZag keeps, per operand and memory level, the amount moved per period, the number
    of periods and the number of memory units; the product is the element count (ZigZag's own integers: for a
    dimension that is not a multiple of 16 it spreads the remainder over the folds and truncates per tile, so
    e.g. 1000x64x1000 writes 63 * 15873 = 999999 outputs, not 1e6).

    move_count=True (conv path): ZigZag's ``data_elem_move_count`` of the DRAM level, i.e.
    round(MACs / product of the loops below the DRAM that reuse the operand), with no per-tile truncation
    (r18c2_nopad56 writes 186624 outputs, the reference value, where the per-period product gives 186620).
    """
    from zigzag.mapping.data_movement import DataDirection, DataMoveAttr

    out = {}
    mapping = cme.mapping
    for layer_op in cme.layer.layer_operands:
        top = mapping.mem_level[layer_op] - 1  # index of the DRAM level for this operand
        umdm = mapping.unit_mem_data_movement[layer_op][top]
        if move_count:
            elems = umdm.get_attribute(DataMoveAttr.DATA_ELEM_MOVE_COUNT)
            moved = {d: int(elems.get(d)) for d in DataDirection}
        else:
            amount = umdm.get_attribute(DataMoveAttr.DATA_TRANS_AMOUNT_PER_PERIOD)
            count = umdm.get_attribute(DataMoveAttr.DATA_TRANS_PERIOD_COUNT)
            units = mapping.spatial_mapping.unit_count[layer_op][top + 1]
            moved = {d: int(amount.get(d) * count.get(d) * units) for d in DataDirection}
        out[str(layer_op)] = moved
    a_rd = out["I"][DataDirection.RD_OUT_TO_LOW]
    b_rd = out["W"][DataDirection.RD_OUT_TO_LOW]
    c_wr = out["O"][DataDirection.WR_IN_BY_LOW]
    c_rd = out["O"][DataDirection.RD_OUT_TO_LOW]
    return {"dram_ifmap_rd": a_rd, "dram_filter_rd": b_rd, "dram_ofmap_wr": c_wr, "dram_ofmap_rd": c_rd}


def _run_zigzag(tag: str, files: dict, workdir: str):
    """Write the three YAML inputs under workdir/tag, run ZigZag; return (latency, cme)."""
    from zigzag.api import get_hardware_performance_zigzag

    d = os.path.join(workdir, tag)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, name), "w") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)

    _energy, latency, cmes = get_hardware_performance_zigzag(
        workload=os.path.join(d, "workload.yaml"),
        accelerator=os.path.join(d, "accelerator.yaml"),
        mapping=os.path.join(d, "mapping.yaml"),
        opt="latency",
        dump_folder=os.path.join(d, "out"),
        loma_show_progress_bar=False,
    )
    return latency, cmes[0][1][0][0]  # the single layer's CostModelEvaluation


def _verbose(tag: str, cme) -> None:
    print(f"# {tag}: temporal mapping {cme.temporal_mapping}", file=sys.stderr)
    print(f"#   double_buffer_true {cme.double_buffer_true}", file=sys.stderr)
    print(
        f"#   ideal {cme.ideal_cycle} ideal_temporal {cme.ideal_temporal_cycle} "
        f"stall/slack {cme.latency_total0} onload {cme.data_onloading_cycle} "
        f"offload {cme.data_offloading_cycle} drain {cme.systolic_drain_cycle}",
        file=sys.stderr,
    )


def run_shape(m: int, k: int, n: int, double_buffer: bool, workdir: str, verbose: bool = False) -> dict:
    tag = f"g{m}x{k}x{n}_{'db' if double_buffer else 'nodb'}"
    files = {
        "accelerator.yaml": accelerator_description(double_buffer),
        "workload.yaml": workload_description(m, k, n),
        "mapping.yaml": mapping_description(m, k, n),
    }
    latency, cme = _run_zigzag(tag, files, workdir)
    row = {"shape": f"{m}x{k}x{n}", "variant": "os_fixed" if double_buffer else "os_fixed_nodb"}
    row["cycles"] = int(round(latency))
    row.update(_dram_traffic(cme))
    if verbose:
        _verbose(tag, cme)
    return row


def run_conv(cv: Conv, double_buffer: bool, workdir: str, verbose: bool = False) -> dict:
    tag = f"{cv.name}_{'db' if double_buffer else 'nodb'}"
    files = {
        "accelerator.yaml": accelerator_description(double_buffer),
        "workload.yaml": conv_workload_description(cv),
        "mapping.yaml": conv_mapping_description(cv),
    }
    latency, cme = _run_zigzag(tag, files, workdir)
    row = {"shape": cv.name, "variant": "os_fixed" if double_buffer else "os_fixed_nodb"}
    row.update(c=cv.c, h=cv.h, w=cv.w, k=cv.k, r=cv.r, stride=cv.s, out_h=cv.out_h, out_w=cv.out_w)
    row["cycles"] = int(round(latency))
    row.update(_dram_traffic(cme, move_count=True))
    rule = conv_ifmap_rule(cv, double_buffer)
    if rule["dram_ifmap_rd"] != row["dram_ifmap_rd"]:
        print(f"# WARNING {tag}: conv_ifmap_rule gives {rule}, ZigZag {row['dram_ifmap_rd']}", file=sys.stderr)
    if verbose:
        print(f"#   conv_ifmap_rule: {rule}", file=sys.stderr)
        _verbose(tag, cme)
        per_period = _dram_traffic(cme)
        print(f"#   unrolling (OX, OY, K) {cv.unrolling()}; spatial {cme.spatial_mapping}", file=sys.stderr)
        print(f"#   DRAM traffic as period amount x count: {per_period}", file=sys.stderr)
        tile = {str(op): v for op, v in cme.mapping.data_elem_per_level.items()}
        print(f"#   elements held per level (PE, reg, SRAM, DRAM): {tile}", file=sys.stderr)
    return row


def _csv_block(rows: list[dict], columns: list[str]) -> str:
    version = metadata.version("zigzag-dse")
    buf = io.StringIO()
    buf.write(f"# {' '.join([sys.executable] + sys.argv)} ; ZigZag (zigzag-dse) {version}\n")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="GEMM shapes MxKxN and/or conv shapes c<C>x<H>x<W>k<K>r<R>s<S>")
    ap.add_argument("-o", "--output", help="also write the CSV here")
    ap.add_argument("--nodb", action="store_true", help="also run without force_double_buffering")
    ap.add_argument(
        "--check", action="store_true", help="compare the reference shapes (GEMM and conv) against reference_results.csv"
    )
    ap.add_argument("--keep", help="write ZigZag input/output files here instead of a temp dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    logging.disable(logging.CRITICAL if not args.verbose else logging.NOTSET)
    parsed = [parse_any_shape(s) for s in args.shapes]
    gemms = [s for s in parsed if not isinstance(s, Conv)]
    convs = [s for s in parsed if isinstance(s, Conv)]
    if args.check or not parsed:
        gemms = [parse_shape(s) for s in REFERENCE] + [s for s in gemms if f"{s[0]}x{s[1]}x{s[2]}" not in REFERENCE]
        convs = [parse_any_shape(s) for s in CONV_REFERENCE] + [c for c in convs if c.name not in CONV_REFERENCE]
    if args.output and gemms and convs:
        ap.error("-o takes either GEMM or conv shapes, not both")
    variants = [True, False] if args.nodb else [True]

    rows: list[dict] = []
    conv_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="zz_fqtsim_") as tmp:
        work = args.keep or tmp
        for m, k, n in gemms:
            for db in variants:
                rows.append(run_shape(m, k, n, db, work, args.verbose))
                logging.disable(logging.CRITICAL if not args.verbose else logging.NOTSET)
        for cv in convs:
            for db in variants:
                conv_rows.append(run_conv(cv, db, work, args.verbose))
                logging.disable(logging.CRITICAL if not args.verbose else logging.NOTSET)

    text = (_csv_block(rows, COLUMNS) if rows else "") + (_csv_block(conv_rows, CONV_COLUMNS) if conv_rows else "")
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)

    bad = 0
    names = {v: k for k, v in CONV_ALIASES.items()}
    for row in rows + conv_rows:
        ref = REFERENCE.get(row["shape"]) or CONV_REFERENCE.get(row["shape"])
        if ref is None or row["variant"] != "os_fixed":
            continue
        got = (row["cycles"], row["dram_ifmap_rd"], row["dram_filter_rd"], row["dram_ofmap_wr"])
        status = "OK" if got[1:] == ref[1:] else "MISMATCH"
        bad += status != "OK"
        cyc = "cycles equal" if got[0] == ref[0] else f"cycles {got[0]} vs ref {ref[0]}"
        label = row["shape"] + (f" ({names[row['shape']]})" if row["shape"] in names else "")
        print(f"# check {label}: traffic {status} {got[1:]} vs ref {ref[1:]}; {cyc}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
