#!/usr/bin/env python
"""Cross-check fqtsim's GEMM DRAM traffic against ZigZag (zigzag-dse 3.9.1).

Not a pytest module (the name does not start with ``test_``).  Run it with the
interpreter that has ZigZag installed, e.g.::

    /tmp/zz/bin/python tests/peers/run_zigzag.py 128x784x512 200x300x100
    /tmp/zz/bin/python tests/peers/run_zigzag.py --check           # reference rows
    /tmp/zz/bin/python tests/peers/run_zigzag.py -o out.csv --nodb 64x64x64

Shapes are ``MxKxN`` (an optional leading ``g`` is accepted) for the GEMM
C[M,N] = A[M,K] @ B[K,N].  The accelerator is the reference array of
shared/peers/README.md:

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

All ZigZag input files (accelerator, workload, mapping YAML) are written by
this script into a temporary directory.  Output: CSV with columns
shape,variant,cycles,dram_ifmap_rd,dram_filter_rd,dram_ofmap_wr (elements =
bytes, everything is int8), printed to stdout and optionally written to -o.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
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


# --------------------------------------------------------------------------- inputs
def _port(name: str, kind: str, bw: int, alloc: list[str]) -> dict:
    return {"name": name, "type": kind, "bandwidth_min": bw, "bandwidth_max": bw, "allocation": alloc}


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
        "sram_ifmap": {
            "size": SRAM_A_BITS,
            "r_cost": 10.0,
            "w_cost": 12.0,
            "area": 0,
            "latency": 1,
            "operands": ["I1"],
            "ports": [
                _port("r_port_1", "read", sram_bw, ["I1, tl"]),
                _port("w_port_1", "write", sram_bw, ["I1, fh"]),
            ],
            "served_dimensions": ["D1", "D2"],
            "force_double_buffering": double_buffer,
        },
        "sram_filter": {
            "size": SRAM_B_BITS,
            "r_cost": 10.0,
            "w_cost": 12.0,
            "area": 0,
            "latency": 1,
            "operands": ["I2"],
            "ports": [
                _port("r_port_1", "read", sram_bw, ["I2, tl"]),
                _port("w_port_1", "write", sram_bw, ["I2, fh"]),
            ],
            "served_dimensions": ["D1", "D2"],
            "force_double_buffering": double_buffer,
        },
        "sram_ofmap": {
            "size": SRAM_C_BITS,
            "r_cost": 10.0,
            "w_cost": 12.0,
            "area": 0,
            "latency": 1,
            "operands": ["O"],
            "ports": [
                _port("r_port_1", "read", ofmap_bw, ["O, th"]),
                _port("w_port_1", "write", ofmap_bw, ["O, fl"]),
                # psum read-back / refill paths (unused when K is whole inside the PE)
                _port("r_port_2", "read", ofmap_bw, ["O, tl"]),
                _port("w_port_2", "write", ofmap_bw, ["O, fh"]),
            ],
            "served_dimensions": ["D1", "D2"],
            "force_double_buffering": double_buffer,
        },
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


# --------------------------------------------------------------------------- run
def parse_shape(text: str) -> tuple[int, int, int]:
    t = text.strip().lstrip("g")
    parts = t.split("x")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _dram_traffic(cme) -> dict[str, int]:
    """Elements moved across the DRAM <-> SRAM boundary, per operand, from ZigZag's data-movement record.

    ZigZag keeps, per operand and memory level, the amount moved per period, the number of periods and
    the number of memory units; the product is the element count (ZigZag's own integers: for a dimension
    that is not a multiple of 16 it spreads the remainder over the folds and truncates per tile, so e.g.
    1000x64x1000 writes 63 * 15873 = 999999 outputs, not 1e6).
    """
    from zigzag.mapping.data_movement import DataDirection, DataMoveAttr

    out = {}
    mapping = cme.mapping
    for layer_op in cme.layer.layer_operands:
        top = mapping.mem_level[layer_op] - 1  # index of the DRAM level for this operand
        umdm = mapping.unit_mem_data_movement[layer_op][top]
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


def run_shape(m: int, k: int, n: int, double_buffer: bool, workdir: str, verbose: bool = False) -> dict:
    from zigzag.api import get_hardware_performance_zigzag

    tag = f"g{m}x{k}x{n}_{'db' if double_buffer else 'nodb'}"
    d = os.path.join(workdir, tag)
    os.makedirs(d, exist_ok=True)
    files = {
        "accelerator.yaml": accelerator_description(double_buffer),
        "workload.yaml": workload_description(m, k, n),
        "mapping.yaml": mapping_description(m, k, n),
    }
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
    cme = cmes[0][1][0][0]  # the single layer's CostModelEvaluation
    row = {"shape": f"{m}x{k}x{n}", "variant": "os_fixed" if double_buffer else "os_fixed_nodb"}
    row["cycles"] = int(round(latency))
    row.update(_dram_traffic(cme))
    if verbose:
        print(f"# {tag}: temporal mapping {cme.temporal_mapping}", file=sys.stderr)
        print(f"#   double_buffer_true {cme.double_buffer_true}", file=sys.stderr)
        print(
            f"#   ideal {cme.ideal_cycle} ideal_temporal {cme.ideal_temporal_cycle} "
            f"stall/slack {cme.latency_total0} onload {cme.data_onloading_cycle} "
            f"offload {cme.data_offloading_cycle} drain {cme.systolic_drain_cycle}",
            file=sys.stderr,
        )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="GEMM shapes MxKxN")
    ap.add_argument("-o", "--output", help="also write the CSV here")
    ap.add_argument("--nodb", action="store_true", help="also run without force_double_buffering")
    ap.add_argument("--check", action="store_true", help="compare the reference shapes against reference_results.csv")
    ap.add_argument("--keep", help="write ZigZag input/output files here instead of a temp dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    logging.disable(logging.CRITICAL if not args.verbose else logging.NOTSET)
    shapes = [parse_shape(s) for s in args.shapes]
    if args.check or not shapes:
        shapes = [parse_shape(s) for s in REFERENCE] + [s for s in shapes if f"{s[0]}x{s[1]}x{s[2]}" not in REFERENCE]
    variants = [True, False] if args.nodb else [True]

    rows = []
    with tempfile.TemporaryDirectory(prefix="zz_fqtsim_") as tmp:
        work = args.keep or tmp
        for m, k, n in shapes:
            for db in variants:
                rows.append(run_shape(m, k, n, db, work, args.verbose))
                logging.disable(logging.CRITICAL if not args.verbose else logging.NOTSET)

    version = metadata.version("zigzag-dse")
    buf = io.StringIO()
    buf.write(f"# {' '.join([sys.executable] + sys.argv)} ; ZigZag (zigzag-dse) {version}\n")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    sys.stdout.write(buf.getvalue())
    sys.stdout.flush()
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(buf.getvalue())

    bad = 0
    for row in rows:
        ref = REFERENCE.get(row["shape"])
        if ref is None or row["variant"] != "os_fixed":
            continue
        got = (row["cycles"], row["dram_ifmap_rd"], row["dram_filter_rd"], row["dram_ofmap_wr"])
        status = "OK" if got[1:] == ref[1:] else "MISMATCH"
        bad += status != "OK"
        cyc = "cycles equal" if got[0] == ref[0] else f"cycles {got[0]} vs ref {ref[0]}"
        print(f"# check {row['shape']}: traffic {status} {got[1:]} vs ref {ref[1:]}; {cyc}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
