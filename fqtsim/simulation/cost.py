"""Closed-form costs: the events of a GEMM on a device, computed without running it.

The same loop nest as the emulating `Device` (see `fqtsim.hardware.mapping`), summed over classes of
identical phases instead of walked, so it is fast enough for ImageNet-scale models and serves as
the independent check on the device's ledger. Overflow events depend on data: only the device
counts them.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd

from fqtsim.hardware.conv import Im2col, col2im
from fqtsim.hardware.hw import HWConfig, as_hw
from fqtsim.simulation.ledger import COLUMNS, GemmSpec, add, frame, merge, price
from fqtsim.hardware.mapping import (Tiling, as_int, by_columns, check_gemm, container_bits,
                                     ddr_estimate,
                                     live_wide_elements, loaded, loop_units, loss_producer, nbytes,
                                     operand_tiles, parks_psums, phase_stalls, plans, produced_by,
                                     stored_output_bits, wide_bits, wide_level)
from fqtsim.hardware.mapping import fill_drain, fold_starts
from fqtsim.simulation.overlap import overlapped
from fqtsim.simulation.schedule import (QuantScheme, as_scheme, block_events, correction_events,
                                        input_events,
                                        output_events, output_writeback, rename_wide_output,
                                        BASELINE, activation_consumer, activation_scheme,
                                        gathers, quantized_shape, scale_events,
                                        bias_events, state_bytes, update_events,
                                        unpredicted, wide_gradient_level,
                                        FORWARD_BITS, check_readable,
                                        GRAD_WEIGHT_BITS, weight_gradient_method)
from fqtsim.quantizers.storage import DEFAULT_BLOCK, FP32_STATE, check_blocks, state_formats


def gemm(hw: HWConfig, m: int, n: int, k: int, *, a_bits: int = 8, b_bits: int = 8,
         out_bits: int = 8, writeback: str = "fused", scope: str = "tensor",
         a_quant: QuantScheme | None = None, a_offset: bool | None = None,
         b_offset: bool = False, a_im2col: Im2col | None = None, b_im2col: Im2col | None = None,
         col2im: Im2col | None = None, consumer: tuple | None = None,
         b_sums_known: bool = False, name: str = "gemm") -> pd.DataFrame:
    """Ledger rows of one (M x K) @ (K x N) GEMM with `a_bits` x `b_bits` operand codes.

    `writeback="fused"` requantizes in the output pipeline and writes `out_bits` codes to DDR;
    `"materialized"` writes the raw result at accumulator width (partial-sum width when the
    accumulator spills), to TCM when the live part of its range `scope` fits beside the tiles,
    else to DDR; `"handoff"` leaves it at accumulator width for the next quantizer (whose
    wide_write stores it). `a_quant`: A is quantized by that scheme on the device from a wide
    tensor (a gradient; or an activation, for an im2col A its input map), with the passes of
    `fqtsim.simulation.schedule` before and after the GEMM (BHQ: T^-1 on the output tiles in
    the pipeline where one row tile holds every row, else on the output materialized whole).
    `a_offset`/`b_offset`: the operand's codes are affine (offset + scale * q), which
    costs a rank-1 correction after the GEMM; A's default is whether it is quantized with offsets (not mxint).
    `a_im2col` (A, M x K) or `b_im2col` (B, K x N): the operand is a convolution's im2col matrix
    (`fqtsim.hardware.conv.Im2col`), built on chip from its feature map, which is what DDR holds and
    moves. `col2im`: the output is such a matrix of a gradient, folded back onto its feature
    map in TCM (the grad_input GEMM of a convolution). `consumer`: (method, range policy, bits)
    of the gradient quantizer that reads a handed-off output wide; the mapper weighs where the
    tiling leaves that gradient (a producer's plan keeps room for it where that pays).
    `b_sums_known`: B is a weight whose column sums (for A's zero-point correction) the update
    pass keeps, so the GEMM does not sum it. `hw` may be a config path; `a_quant` a method
    name ("ptq", "psq", "bhq": dynamic ranges).
    m, n, k and the widths are integers (numpy integers too; not bools). The ledger's
    `attrs["mapping"]` says how the GEMM was laid out (loop order, tiles, operands held whole,
    TCM taken and left, where the output went).
    """
    rows, mapping, _ = _priced(hw, m, n, k, a_bits, b_bits, out_bits, writeback, scope, a_quant,
                               a_offset, b_offset, a_im2col, b_im2col, col2im, consumer,
                               b_sums_known, name)
    ledger = frame(rows)
    ledger.attrs["mapping"] = mapping
    return ledger


def _priced(hw, m, n, k, a_bits=8, b_bits=8, out_bits=8, writeback="fused", scope="tensor",
            a_quant=None, a_offset=None, b_offset=False, a_im2col=None, b_im2col=None,
            col2im=None, consumer=None, b_sums_known=False, name="gemm") -> tuple[list, dict, dict]:
    """`gemm`'s ledger rows unframed, its mapping, and its raw events."""
    hw = as_hw(hw)
    a_quant = as_scheme(a_quant)
    for option, value in (("a_offset", a_offset), ("b_offset", b_offset),
                          ("b_sums_known", b_sums_known)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{option}: got {value!r}; expected True or False")
    if not isinstance(name, str):
        raise TypeError(f"name: got {name!r}; expected a string")
    a_offset = a_quant is not None and a_quant.affine if a_offset is None else bool(a_offset)
    m, n, k, a_bits, b_bits, out_bits = check_gemm(hw, m, n, k, a_bits, b_bits, out_bits,
                                                   writeback, scope)
    _check_im2col(a_im2col, "a_im2col", m, k)
    _check_im2col(b_im2col, "b_im2col", k, n)
    _check_im2col(col2im, "col2im", m, n)
    spec = Gemm(m, n, k, a_bits, b_bits, out_bits, writeback, scope, a_quant, a_offset, b_offset,
                a_im2col, b_im2col, col2im, check_consumer(consumer, writeback), bool(b_sums_known))
    tiling = layout(hw, spec)
    events, level = gemm_events(hw, spec, tiling)
    mapping = {"m": spec.m, "k": spec.k, "n": spec.n, "loop_order": tiling.name,
               "tile_m": tiling.tm, "tile_n": tiling.tn, "tile_k": tiling.tk,
               "a_whole": tiling.a_whole, "b_whole": tiling.b_whole,
               "tcm_bytes": tiling.footprint, "tcm_free": tiling.free,
               "psums": tiling.psums or "-",
               "output_to": level if spec.writeback != "handoff" else "handoff"}
    return price(hw, name, GemmSpec(spec.a_bits, spec.b_bits), events), mapping, events



def conv2d(hw: HWConfig, batch: int, c_in: int, h: int, w: int, c_out: int, kernel, stride=1,
           padding=0, *, a_bits: int = 8, b_bits: int = 8, out_bits: int = 8,
           writeback: str = "fused", name: str = "conv") -> pd.DataFrame:
    """Ledger rows of a 2-D convolution's forward pass: `batch` inputs of `c_in` x `h` x `w`,
    `c_out` filters of `kernel` (an int or (kh, kw)), `stride` and zero `padding` likewise. It
    runs as its im2col GEMM with the im2col rows built on chip from the feature map (see
    `fqtsim.hardware.conv`): each input element comes from DDR as often as the loop nest revisits the
    tile that covers it, padding never. Other arguments as for `gemm`."""
    win = Im2col(batch, c_in, h, w, kernel, stride, padding)
    if (cout := as_int(c_out)) is None or cout < 1:
        raise ValueError(f"c_out: got {c_out!r}; expected an integer >= 1")
    return gemm(hw, win.rows, cout, win.cols, a_bits=a_bits, b_bits=b_bits, out_bits=out_bits,
                writeback=writeback, a_im2col=win, name=name)

@dataclass(frozen=True)
class Gemm:
    """One GEMM as `gemm` takes it, checked: what its events and its mapping depend on."""
    m: int
    n: int
    k: int
    a_bits: int
    b_bits: int
    out_bits: int
    writeback: str
    scope: str
    a_quant: QuantScheme | None
    a_offset: bool
    b_offset: bool
    a_im2col: Im2col | None
    b_im2col: Im2col | None
    col2im: Im2col | None
    consumer: tuple | None = None
    b_sums_known: bool = False


@functools.lru_cache(maxsize=8192)
def layout(hw: HWConfig, spec: Gemm) -> Tiling:
    """The tiling `spec` runs with: of the mapper's candidates (`fqtsim.hardware.mapping.plans`:
    the best few estimates of each order of the output loops, and the best that leaves room for
    a materialized output or for the gradient a consumer reads wide), the one whose whole cost,
    quantizer passes included, is least by the config's `mapping.objective`."""
    writeback, scope = output_writeback(spec.a_quant, spec.writeback, spec.scope)
    options = plans(hw, spec.m, spec.n, spec.k, spec.a_bits, spec.b_bits,
                    stored_output_bits(hw, writeback, spec.out_bits), spec.a_im2col, spec.b_im2col)
    chosen = [t for order in sorted({t.order for t in options})   # K's place competes within
              for t in itertools.islice((t for t in options if t.order == order), CANDIDATES)]
    if hw.mapping.objective != "cycles":   # a few cycles saved can cost much more DDR traffic
        moved = sorted(options, key=lambda t: (ddr_estimate(
            hw, t, spec.m, spec.n, spec.k, spec.a_bits, spec.b_bits, spec.a_im2col,
            spec.b_im2col), t.key))
        chosen += moved[:CANDIDATES]
    if writeback == "materialized":   # room for the wide output changes where it goes
        chosen += _first(t for t in options
                         if wide_level(hw, t, live_wide_elements(scope, t, spec.m, spec.n)) == "tcm")
    if spec.consumer is not None:     # and room for the gradient the next quantizer reads wide
        chosen += _first(t for t in options if (c := _consumer_scheme(spec, t))[0]
                         and wide_gradient_level(hw, t, *c[1:]) == "tcm")
    # BHQ with every row in one tile: T^-1 in the pipeline, no wide output
    chosen += _first(t for t in options if gathers(hw, spec.a_quant, t, spec.m))
    chosen = list(dict.fromkeys(chosen))   # each candidate priced once
    if len(chosen) == 1:
        return chosen[0]
    return min(chosen, key=lambda t: _objective(hw, spec, t))


CANDIDATES = 4   # best estimates of each output-loop order that the mapper prices in full


def _first(tilings) -> list:
    return list(itertools.islice(tilings, 1))


def _objective(hw: HWConfig, spec: Gemm, tiling: Tiling) -> float:
    events, _ = gemm_events(hw, spec, tiling, after=False)
    if spec.consumer is not None:
        merge(events, _consumer_events(hw, spec, tiling))
    rows = price(hw, "gemm", GemmSpec(spec.a_bits, spec.b_bits), events)
    energy, cycles = sum(r[5] for r in rows), sum(r[6] for r in rows)
    return {"energy": energy, "cycles": cycles, "edp": energy * cycles}[hw.mapping.objective]


def _consumer_events(hw: HWConfig, spec: Gemm, tiling: Tiling) -> dict:
    """What the quantizer reading this GEMM's handed-off output does with it, where this tiling
    leaves it: per sample, the output's elements (folded back onto the input map for a conv)."""
    _, scheme, samples, per_sample = _consumer_scheme(spec, tiling)
    return input_events(hw, tiling, scheme, samples, per_sample, spec.consumer[2])


def _consumer_scheme(spec: Gemm, tiling: Tiling) -> tuple:
    """(whether it writes the gradient wide, its scheme, samples, elements per sample)."""
    method, policy, _ = spec.consumer
    rows = spec.a_quant.rows_per_sample if spec.a_quant is not None else 1
    samples = spec.m // rows
    per_sample = (spec.m * spec.n if spec.col2im is None else spec.col2im.elements) // samples
    scheme = QuantScheme(method, policy, producer=produced_by(tiling, spec.n, rows))
    return scheme.materializes, scheme, samples, per_sample


def check_consumer(consumer, writeback: str):
    if consumer is None:
        return None
    try:
        method, policy, bits = consumer
        QuantScheme(method, policy)
        ok = as_int(bits) is not None and 2 <= bits <= 8
    except (TypeError, ValueError):
        ok = False
    if not ok or writeback != "handoff":
        raise ValueError(f"consumer: got {consumer!r}; expected (method, range policy, bits) of "
                         f"the quantizer reading a handed-off output (writeback='handoff'), e.g. "
                         f"('psq', 'dynamic', 8)")
    return (method, policy, int(bits))


def gemm_events(hw: HWConfig, spec: Gemm, tiling: Tiling, after: bool = True) -> tuple[dict, str]:
    """Raw events of `spec` laid out by `tiling`, and the level its output is written to.
    `after`: with the offset corrections and col2im, which no tiling changes."""
    (m, n, k, a_bits, b_bits, out_bits, writeback, scope, a_quant, a_offset, b_offset, a_im2col,
     b_im2col, col2im, _, _) = (getattr(spec, f.name) for f in fields(spec))
    handoff = writeback == "handoff"
    writeback, scope = output_writeback(a_quant, writeback, scope, gathers(hw, a_quant, tiling, m))
    out_store = stored_output_bits(hw, writeback, out_bits)
    level = "ddr"
    if writeback == "materialized":
        level = wide_level(hw, tiling, live_wide_elements(scope, tiling, m, n))

    rows, cols, spill = hw.array.rows, hw.array.cols, hw.accumulator.spill_every
    psum_bytes = nbytes(1, wide_bits(hw))
    nm, nn, nk = tiling.tile_counts(m, n, k)
    if tiling.k_at < 2 and nk > 1:
        events = _k_outer_events(hw, spec, tiling, writeback, out_store, level)
        return _after(hw, spec, tiling, events, level, handoff, after), level
    dims = operand_tiles(tiling, m, n, k, a_bits, b_bits, a_im2col, b_im2col)
    outer, inner = tiling.order
    n_inner = {"m": nm, "n": nn}[inner]
    events = {}
    for so, co, first_o, *moves_o in dims[outer]:
        for si, ci, first_i, *moves_i in dims[inner]:
            times = co * ci
            sm, sn = (si, so) if inner == "m" else (so, si)
            (a_each, a_new), (b_each, b_new) = (moves_i, moves_o) if inner == "m" else (moves_o, moves_i)
            # the inner loop's operand stays in TCM only if it never changes: one inner tile, one K tile
            inner_load = first_o and first_i if n_inner == 1 and nk == 1 else True
            outer_load = first_i if nk == 1 else True
            load_a, load_b = (inner_load, outer_load) if inner == "m" else (outer_load, inner_load)
            # an operand held whole loads each tile on first use: in the first iteration of the
            # loop it does not depend on (n for A, m for B)
            first = {outer: first_o, inner: first_i}
            load_a = first["n"] if tiling.a_whole else load_a
            load_b = first["m"] if tiling.b_whole else load_b
            a_in = (a_new if tiling.a_whole else a_each) if load_a else 0.0
            b_in = (b_new if tiling.b_whole else b_each) if load_b else 0.0
            folds_m, folds_n = math.ceil(sm / rows), math.ceil(sn / cols)
            read_a, read_b = sm * k * folds_n, sn * k * folds_m
            # each fold's K slice, and its fill and drain whenever it starts (see the loop nest)
            compute = folds_m * folds_n * k + fold_starts(hw, sm, sn, nk) * fill_drain(hw)
            out = nbytes(sm * sn, out_store)
            tcm_read = nbytes(read_a, a_bits) + nbytes(read_b, b_bits)
            tcm_write = a_in + b_in + (out if writeback != "handoff" else 0.0)
            # partial sums in TCM: at spill points, or at the end of each K tile when several
            # folds share a split K
            parks = parks_psums(hw, sm, sn, tiling.tk, k)
            if spill is not None or parks:
                spills = sm * sn * (math.ceil(k / spill) if spill is not None else nk)
                psum_rw = (2 * spills - sm * sn) * psum_bytes
                tcm_read += psum_rw - spills * psum_bytes + sm * sn * psum_bytes
                tcm_write += spills * psum_bytes
                add(events, "psum_spill", "tcm", times * spills, times * psum_rw)
                add(events, "psum_drain", "tcm", times * sm * sn, times * sm * sn * psum_bytes)
            ddr = a_in + b_in
            if level == "ddr" and writeback != "handoff":
                ddr += out
                tcm_read += out
            _phase(events, hw, times, sm * sn * k, compute, (a_in, b_in), (read_a, read_b),
                   (a_bits, b_bits), ddr, tcm_read, tcm_write)
            if writeback != "handoff":
                add(events, "writeback", level, times * sm * sn, times * out)
            if writeback == "fused":
                add(events, "requantize", "array", times * sm * sn)
    return _after(hw, spec, tiling, events, level, handoff, after), level


def _after(hw, spec: Gemm, tiling: Tiling, events: dict, level: str, handoff: bool, after: bool):
    """The loop nest's events with the quantizer's passes and (`after`) the corrections."""
    a_quant = spec.a_quant
    gathered = gathers(hw, a_quant, tiling, spec.m)
    merge(events, block_events(hw, a_quant, spec.m, spec.n, spec.k, events))
    rename_wide_output(events, a_quant, gathered)
    merge(events, scale_events(hw, a_quant, spec.writeback, spec.m * spec.n, gathered))
    if a_quant is not None:
        merge(events, input_events(hw, tiling, a_quant,
                                   *quantized_shape(spec.m, spec.k, spec.a_im2col), spec.a_bits))
        merge(events, output_events(hw, a_quant, spec.m, spec.n, spec.out_bits, level, handoff,
                                    gathered))
    if after:
        merge(events, correction_events(spec.m, spec.n, spec.k, spec.a_offset, spec.b_offset,
                                        spec.b_sums_known))
        if spec.col2im is not None:
            merge(events, col2im_events(hw, *col2im(spec.col2im)))
    return events


def _k_outer_events(hw: HWConfig, spec: Gemm, tiling: Tiling, writeback: str, out_store: int,
                    level: str) -> dict:
    """The loop nest with K not innermost: each iteration visits one output tile for one K
    tile; the tile's partial sums wait at `tiling.psums` between visits (written on the first,
    read and written on the others, read out on the last, before the write-back)."""
    m, n, k, a_bits, b_bits = spec.m, spec.n, spec.k, spec.a_bits, spec.b_bits
    rows, cols, spill = hw.array.rows, hw.array.cols, hw.accumulator.spill_every
    psum_bytes, at = nbytes(1, wide_bits(hw)), tiling.psums
    trips = dict(zip("mnk", tiling.tile_counts(m, n, k)))
    units = loop_units(tiling, m, n, k, spec.a_im2col, spec.b_im2col)
    events = {}
    for combo in itertools.product(*(units[loop] for loop in tiling.loops)):
        it = dict(zip(tiling.loops, combo))
        (sm, cm, fm, _, am), (sn, cn, fn, _, bn), (sk, ck, fk, lk, ak, bk) = it["m"], it["n"], it["k"]
        times = cm * cn * ck
        first = {"m": fm, "n": fn, "k": fk}
        load_a = first["n"] if tiling.a_whole else loaded(tiling.loops, "mk", trips, first)
        load_b = first["m"] if tiling.b_whole else loaded(tiling.loops, "kn", trips, first)
        pick = 1 if tiling.a_whole else 0
        a_in = nbytes(am[pick] * ak[pick], a_bits) if load_a else 0.0
        pick = 1 if tiling.b_whole else 0
        b_in = nbytes(bk[pick] * bn[pick], b_bits) if load_b else 0.0
        folds_m, folds_n = math.ceil(sm / rows), math.ceil(sn / cols)
        read_a, read_b = sm * sk * folds_n, sn * sk * folds_m
        # every visit restarts each fold: its sums came back from where they waited
        compute = folds_m * folds_n * (sk + fill_drain(hw))
        tcm_read = nbytes(read_a, a_bits) + nbytes(read_b, b_bits)
        tcm_write, ddr = a_in + b_in, a_in + b_in
        points = math.ceil(sk / spill) if spill is not None else 1
        written = sm * sn * points * psum_bytes
        read = written - (sm * sn * psum_bytes if fk else 0.0)
        add(events, "psum_spill", at, times * sm * sn * points, times * (written + read))
        moved = {"tcm": [0.0, 0.0], "ddr": [0.0, 0.0]}   # (read, written) at the psums' level
        moved[at][0] += read
        moved[at][1] += written
        if lk:   # the last visit: the sums are read out and the output written back
            drain = sm * sn * psum_bytes
            add(events, "psum_drain", at, times * sm * sn, times * drain)
            moved[at][0] += drain
            out = nbytes(sm * sn, out_store)
            if writeback != "handoff":
                add(events, "writeback", level, times * sm * sn, times * out)
                tcm_write += out
                if level == "ddr":
                    ddr += out
                    tcm_read += out
            if writeback == "fused":
                add(events, "requantize", "array", times * sm * sn)
        tcm_read += moved["tcm"][0]
        tcm_write += moved["tcm"][1]
        ddr += sum(moved["ddr"])
        _phase(events, hw, times, sm * sn * sk, compute, (a_in, b_in), (read_a, read_b),
               (a_bits, b_bits), ddr, tcm_read, tcm_write)
    return events


def _phase(events, hw, times, macs, compute, loads, reads, bits, ddr, tcm_read, tcm_write):
    """`times` identical phases: their MACs and compute cycles, operand loads (bytes) and reads
    (elements), and the cycles they wait on DDR and TCM beyond their compute."""
    stall_ddr, stall_tcm = phase_stalls(hw, compute, ddr, tcm_read, tcm_write)
    add(events, "mac", "array", times * macs, 0.0, times * compute)
    for event, moved, b in zip(("load_a", "load_b"), loads, bits):
        add(events, event, "ddr", times * _elements(moved, b), times * moved)
    for event, read, b in zip(("read_a", "read_b"), reads, bits):
        add(events, event, "tcm", times * read, times * nbytes(read, b))
    add(events, "stall", "ddr", 0, 0.0, times * stall_ddr)
    add(events, "stall", "tcm", 0, 0.0, times * stall_tcm)


def _elements(moved: float, bits: int) -> int:
    """Elements in `moved` bytes of `bits`-wide values (exact: bytes are whole containers)."""
    return round(moved * 8 / container_bits(bits))


def _check_im2col(win, option: str, rows: int, cols: int):
    if win is None:
        return
    if not isinstance(win, Im2col):
        raise TypeError(f"{option}: got {win!r}; expected a fqtsim.hardware.conv.Im2col or None")
    if (win.rows, win.cols) != (rows, cols):
        raise ValueError(f"{option}: its im2col matrix is {win.rows}x{win.cols}, the GEMM's "
                         f"operand {rows}x{cols}")


def col2im_events(hw: HWConfig, entries: int, elements: int) -> dict:
    """Folding an im2col gradient onto its feature map as its tiles leave the array: of its
    `entries` that land inside the map, the first on each of the `elements` is the map's own
    store (its consumer's wide_write, or the write-back for a pass between the GEMMs); each later
    one is a read-modify-write in TCM and one vector add. Nothing for kernels that do not
    overlap."""
    events = {}
    if entries > elements:
        width, folds = nbytes(1, wide_bits(hw)), entries - elements
        add(events, "col2im", "tcm", folds, 2 * folds * width)
        add(events, "col2im", "vector", folds)
    return events


def overhead(hw: HWConfig, m: int, n: int, k: int, schemes, *, grad_bits: int = 8,
             b_bits: int = 8) -> pd.DataFrame:
    """What each gradient-quantizer scheme adds to dX = Q(dY) @ W over the fused baseline: the
    same GEMM with dY's codes made in its producer's output pipeline from a range known
    beforehand (delayed PTQ: a random number, a requantization and the code write per element,
    which every scheme pays), so that only what the scheme's ranges cost is counted.

    One row per scheme: extra bytes at TCM and DDR, extra vector ops, extra energy and cycles
    (absolute and relative to the baseline), and where the wide gradient lands.
    """
    def totals(ledger):
        moved = ledger[ledger.level.isin(["tcm", "ddr"])]
        by_level = moved.groupby("level")["bytes"].sum()
        return {"tcm_bytes": by_level.get("tcm", 0.0), "ddr_bytes": by_level.get("ddr", 0.0),
                "vector_ops": int(ledger.loc[ledger.level == "vector", "count"].sum()),
                "energy_pj": ledger.energy_pj.sum(), "cycles": ledger.cycles.sum()}

    hw = as_hw(hw)
    if isinstance(schemes, (str, QuantScheme)) or not isinstance(schemes, Iterable):
        schemes = [schemes]
    schemes = [as_scheme(s, "schemes") for s in schemes]
    base = totals(gemm(hw, m, n, k, a_bits=grad_bits, b_bits=b_bits,
                       a_quant=BASELINE))
    rows = []
    for scheme in schemes:
        ledger = gemm(hw, m, n, k, a_bits=grad_bits, b_bits=b_bits, a_quant=scheme)
        extra = {key: value - base[key] for key, value in totals(ledger).items()}
        wide = ledger.loc[ledger.event == "wide_write", "level"]
        rows.append({"quantizer": scheme.method, "range": scheme.range_policy,
                     "wide_to": wide.iloc[0] if len(wide) else "-",
                     "extra_tcm_bytes": extra["tcm_bytes"], "extra_ddr_bytes": extra["ddr_bytes"],
                     "extra_vector_ops": extra["vector_ops"], "extra_energy_pj": extra["energy_pj"],
                     "energy_x": 1 + extra["energy_pj"] / base["energy_pj"],
                     "cycles_x": 1 + extra["cycles"] / base["cycles"]})
    return pd.DataFrame(rows)


def step_overhead(hw: HWConfig, model, batch: int, schemes, grad_bits: int = 8,
                  weights: str = "fp32", momentum: str = "fp32",
                  momentum_block: int = DEFAULT_BLOCK) -> pd.DataFrame:
    """What each gradient-quantizer scheme costs a whole training step of `model` over the
    same step with delayed PTQ (gradient and activation ranges known before their GEMMs: the
    random numbers, requantizations and code writes every scheme pays), with the quantizers
    riding the passes of the ops between the GEMMs and without (`pipeline.share_passes`).

    One row per scheme and sharing: the step's energy (mJ) and cycles, and the extra energy
    and cycles over the baseline (absolute, and as a share of the step), and how much of the
    extra energy is the forward pass's (`extra_forward_mJ`: a run's range policy holds for its
    activations too, so dynamic ranges cost there as well). `weights`, `momentum`,
    `momentum_block`: the stored state, as for `training_step`."""
    hw = as_hw(hw)
    stored = {"weights": weights, "momentum": momentum, "momentum_block": momentum_block}
    if isinstance(schemes, (str, QuantScheme)) or not isinstance(schemes, Iterable):
        schemes = [schemes]
    schemes = [as_scheme(s, "schemes") for s in schemes]
    rows = []
    for shared in (True, False):
        variant = replace(hw, pipeline=replace(hw.pipeline, share_passes=shared))
        base = training_step(variant, model, batch, BASELINE.method, BASELINE.range_policy,
                             grad_bits, **stored)
        base_pj, base_cycles = base.energy_pj.sum(), base.cycles.sum()
        base_forward = _forward_pj(base)
        for scheme in schemes:
            step = training_step(variant, model, batch, scheme.method, scheme.range_policy,
                                 grad_bits, **stored)
            pj, cycles = step.energy_pj.sum(), step.cycles.sum()
            rows.append({"quantizer": scheme.method, "range": scheme.range_policy,
                         "shared": shared, "step_mJ": pj / 1e9, "extra_mJ": (pj - base_pj) / 1e9,
                         "extra_%": 100 * (pj - base_pj) / pj,
                         "extra_forward_mJ": (_forward_pj(step) - base_forward) / 1e9,
                         "cycles_M": cycles / 1e6,
                         "extra_cycles_%": 100 * (cycles - base_cycles) / cycles})
    return pd.DataFrame(rows)


def update_costs(hw: HWConfig, model, batch: int, formats, quantizer: str = "psq",
                 range_policy: str = "dynamic", grad_bits: int = 8,
                 momentum_block: int = DEFAULT_BLOCK) -> pd.DataFrame:
    """One training step of `model` per stored-state format in `formats` ((weights, momentum)
    name pairs): where the state lives and its bytes, the step's energy (mJ), DDR bytes (MB)
    and cycles, and the update's share of the energy and of the DDR bytes."""
    from fqtsim.simulation.workloads import workload

    layers = workload(model) if isinstance(model, str) else list(model)
    rows = []
    for weights, momentum in formats:
        stored = state_formats(weights, momentum, momentum_block)
        step, _, _, home = _training_step(hw, layers, batch, quantizer, range_policy, grad_bits,
                                          stored)
        update = step[step.gemm == "update"]
        pj, ddr = step.energy_pj.sum(), step.loc[step.level == "ddr", "bytes"].sum()
        update_ddr = update.loc[update.level == "ddr", "bytes"].sum()
        rows.append({"weights": weights, "momentum": momentum, "state_at": home,
                     "state_MB": sum(state_bytes(layer.weights, stored, layer.n, layer.bias)
                                     for layer in layers) / 1e6,
                     "step_mJ": pj / 1e9, "update_mJ": update.energy_pj.sum() / 1e9,
                     "update_%": 100 * update.energy_pj.sum() / pj, "ddr_MB": ddr / 1e6,
                     "update_ddr_MB": update_ddr / 1e6,
                     "update_ddr_%": 100 * update_ddr / ddr if ddr else 0.0,
                     "cycles_M": step.cycles.sum() / 1e6})
    return pd.DataFrame(rows)


def _forward_pj(step: pd.DataFrame) -> float:
    """Energy of a step's forward pass: its output GEMMs and the ops between them."""
    return step.loc[step.gemm.isin(["output", "between"]), "energy_pj"].sum()


def training_step(hw: HWConfig, model, batch: int, quantizer: str = "psq",
                  range_policy: str = "dynamic", grad_bits: int = 8, weights: str = "fp32",
                  momentum: str = "fp32", momentum_block: int = DEFAULT_BLOCK) -> pd.DataFrame:
    """Every event of one FQT training step, layer by layer (the `layer` column), as
    `fqtsim.training.fqt` runs it: the forward GEMM on 8-bit codes, its input quantized from the
    layer below's output under `range_policy`; grad_input with the gradient quantized by
    `quantizer` at `grad_bits` (all but the first layer), handed off at full width to the next
    quantizer down or to the pass of an op between them (a conv layer's folded onto its input
    by col2im); grad_weight with the 8-bit per-tensor (PTQ) or per-feature quantizer sharing the
    wide gradient; the SGD update of the weights and momentum stored as `weights` and
    `momentum` (`fqtsim.quantizers.storage`; int8 momentum in blocks of `momentum_block`), in
    TCM or DDR (`state_home`); and the ops between the GEMMs (`between`, `between_grad`:
    `fqtsim.simulation.between`), with the quantizers that ride their passes. With
    `pipeline.overlap` the vector passes' cycles hidden under independent GEMMs are taken out
    (`fqtsim.simulation.overlap`). A transformer's products of two activations (`Layer.per_sample`)
    run as one GEMM per sample and head, their B operand quantized from the wide output of the
    layer it comes from (`b_source`) with their forward GEMM, dB handed off as dA is; its
    embeddings' lookup, gradient scatter and update are `fqtsim.simulation.embedding`'s.

    `model`: a name from `fqtsim.simulation.workloads` or a list of its `Layer`s.
    """
    formats = state_formats(weights, momentum, momentum_block)
    return _training_step(hw, model, batch, quantizer, range_policy, grad_bits, formats)[0].copy()


def _training_step(hw, model, batch, quantizer, range_policy, grad_bits, formats=FP32_STATE):
    """training_step's ledger and the mapping of each of its GEMMs, with the optimizer state
    where `state_home` puts it."""
    from fqtsim.simulation.workloads import Layer, workload

    hw = as_hw(hw)
    layers = workload(model) if isinstance(model, str) else model
    if not isinstance(layers, Iterable) or not (layers := list(layers)) or \
            not all(isinstance(layer, Layer) for layer in layers):
        raise TypeError(f"model: got {model!r}; expected a workload name or a non-empty list of "
                        f"fqtsim.simulation.workloads.Layer")
    if any(layer.kind == "embedding" for layer in layers[1:]):
        raise ValueError("model: an embedding layer can only be the first (it reads the data)")
    if (size := as_int(batch)) is None or size < 1:
        raise ValueError(f"batch: got {batch!r}; expected an integer >= 1")
    QuantScheme(quantizer, range_policy)   # refuse a bad quantizer or range before any work
    if quantizer == "hadamard" and any(not layer.weights and layer.kind != "embedding"
                                       for layer in layers[1:]):
        raise ValueError("quantizer hadamard: grad_input's other operand is rotated by the "
                         "weight update, and this model has products of two activations, whose "
                         "operand has none; pick another quantizer")
    check_blocks({layer.name: layer.weights for layer in layers if layer.weights}, formats)
    check_readable(hw, formats)
    return _placed_step(hw, tuple(layers), size, quantizer, range_policy, grad_bits, formats)


@functools.lru_cache(maxsize=256)
def _placed_step(hw, layers, batch, quantizer, range_policy, grad_bits, formats=FP32_STATE):
    """(ledger, mappings, the config the GEMMs ran on, where the optimizer state lives): state
    in DDR, or in TCM set aside from what the GEMMs tile, whichever the objective prefers."""
    options = [(*_step(hw, layers, batch, quantizer, range_policy, grad_bits, "ddr", formats),
                hw, "ddr")]
    aside = _without_state(hw, layers, formats)
    if aside is not None:
        try:
            options.append((*_step(aside, layers, batch, quantizer, range_policy, grad_bits, "tcm",
                                   formats), aside, "tcm"))
        except ValueError:   # the GEMMs do not fit beside it
            pass
    objective = hw.mapping.objective
    def score(option):
        energy, cycles = option[0].energy_pj.sum(), option[0].cycles.sum()
        return {"energy": energy, "cycles": cycles, "edp": energy * cycles}[objective]
    return min(options, key=score)


def _without_state(hw: HWConfig, layers, formats=FP32_STATE) -> HWConfig | None:
    """The config with the step's optimizer state (in `formats`) set aside in TCM (None where it
    cannot be: no room, or the partitions take what it would need)."""
    state = sum(state_bytes(layer.weights, formats, layer.n, layer.bias) for layer in layers)
    left = hw.tcm.size_bytes - state
    parts = hw.tcm.partitions
    if state == 0 or left <= 0 or (parts is not None and left < sum(parts.sizes_bytes)):
        return None
    return replace(hw, tcm=replace(hw.tcm, size_kib=left / 1024))


def state_home(hw: HWConfig, layers, batch: int, quantizer: str = "psq",
               range_policy: str = "dynamic", grad_bits: int = 8, weights: str = "fp32",
               momentum: str = "fp32",
               momentum_block: int = DEFAULT_BLOCK) -> tuple[HWConfig, str]:
    """Where a training step keeps its weights and momentum (stored as `weights`, `momentum`:
    see `training_step`), and the config its GEMMs then run on: ("tcm", the config with that
    state's bytes set aside from what the GEMMs tile) where it fits and the whole step costs no
    more by `mapping.objective`; else ("ddr", the config as given). A device that trains with
    this config and state home charges what `training_step` does."""
    formats = state_formats(weights, momentum, momentum_block)
    *_, used, home = _training_step(hw, layers, batch, quantizer, range_policy, grad_bits, formats)
    return used, home


def _step(hw, layers, batch, quantizer, range_policy, grad_bits, state_at, formats=FP32_STATE):
    """One step's ledger and mappings on `hw` with the optimizer state (in `formats`) at
    `state_at`."""
    from fqtsim.simulation.between import around

    windows = [None if layer.im2col is None else replace(layer.im2col, samples=batch)
               for layer in layers]
    ops = [around(hw, layer, batch, first=i == 0, quantizer=quantizer, range_policy=range_policy,
                  grad_bits=grad_bits) for i, layer in enumerate(layers)]
    # backward runs from the top: each grad_input GEMM, laid out as it runs, writes the wide
    # gradient of the layer below (the loss writes the top layer's), for its quantizer or for
    # the pass of an op between them (BatchNorm's backward), which then writes the codes
    producers, grad_inputs = [loss_producer(hw)] * len(layers), {}
    for i in range(len(layers) - 1, 0, -1):
        layer = layers[i]
        scheme = QuantScheme(quantizer, range_policy, rows_per_sample=layer.group_rows,
                             producer=producers[i], coded=ops[i].dy_coded)
        below = ops[i - 1]
        dx = _priced(hw, layer.gemms(batch)[0], layer.k, layer.n, grad_bits, FORWARD_BITS,
                     writeback="handoff", a_quant=scheme, b_offset=not layer.weights,
                     col2im=windows[i],
                     consumer=None if below.dz_read or below.dy_coded else
                     (quantizer, range_policy, grad_bits),
                     b_sums_known=bool(layer.weights), name="grad_input")
        grad_inputs[i] = dx
        producers[i - 1] = produced_by(_tiling(dx[1]), layer.k, layer.group_rows)
    outputs = _forward(hw, layers, batch, range_policy, windows, ops)
    rows, plans = [], []
    for i, layer in enumerate(layers):
        if layer.kind == "embedding":
            rows += _embedding_rows(hw, layer, batch, ops[i], state_at, formats)
            continue
        m, times = layer.gemms(batch)
        win, producer = windows[i], producers[i]
        gemms = [("output", _with_bias(hw, outputs[i], layer, m, "forward",
                                       GemmSpec(FORWARD_BITS, FORWARD_BITS)))]
        wide_at = None
        if i > 0:
            gemms.append(("grad_input", grad_inputs[i]))
            wide_at = _level(grad_inputs[i][2], "wide_write")
        scheme = QuantScheme(weight_gradient_method(quantizer), unpredicted(range_policy),
                             shared_at=wide_at, producer=by_columns(producer),
                             coded=ops[i].dy_coded)
        dw = _priced(hw, layer.n, layer.k, m, GRAD_WEIGHT_BITS, FORWARD_BITS,
                     writeback="materialized" if layer.weights else "handoff", a_quant=scheme,
                     b_offset=True, b_im2col=win, name="grad_weight")
        gemms.append(("grad_weight", _with_bias(hw, dw, layer, m, "backward",
                                                GemmSpec(GRAD_WEIGHT_BITS, FORWARD_BITS))))
        if layer.weights:
            events = update_events(hw, layer.weights, _level(dw[2], "writeback"), state_at,
                                   sums=2 if i > 0 else 1, bias=layer.bias, formats=formats,
                                   channels=layer.n, rotated=quantizer == "hadamard" and i > 0)
            gemms.append(("update", (price(hw, "update", GemmSpec(FORWARD_BITS, FORWARD_BITS), events),
                                     None, events)))
        for name, (priced, mapping, _) in gemms:
            if mapping is not None:
                plans.append({"layer": layer.name, "gemm": name, **mapping})
            rows += [(layer.name, g, e, lvl, c * times, b * times, pj * times, cy * times)
                     for g, e, lvl, c, b, pj, cy in priced]
        rows += [(layer.name, *r) for r in between_rows(hw, ops[i])]
    return overlapped(hw, pd.DataFrame(rows, columns=["layer", *COLUMNS])), pd.DataFrame(plans)


def _embedding_rows(hw, layer, batch: int, ops, state_at: str, formats) -> list[tuple]:
    """Ledger rows of an embedding layer (`fqtsim.simulation.embedding`): its lookup as its
    output, the scatter of its gradient as its grad_weight, the tables' update, and its chain."""
    from fqtsim.simulation import embedding

    spec = GemmSpec(FORWARD_BITS, FORWARD_BITS)
    parts = (("output", embedding.gather(hw, layer, batch, state_at, formats)),
             ("grad_weight", embedding.scatter(hw, layer, batch, ops.dx_level)),
             ("update", embedding.update(hw, layer, state_at, formats)))
    return [(layer.name, *row) for name, events in parts for row in price(hw, name, spec, events)] \
        + [(layer.name, *r) for r in between_rows(hw, ops)]


def _with_bias(hw, gemm: tuple, layer, m: int, direction: str, spec: GemmSpec) -> tuple:
    """A priced GEMM (rows, mapping, events) with its layer's bias riding its pipeline: added
    to the forward outputs, its gradient summed beside the weight gradient's."""
    if not layer.bias:
        return gemm
    rows, mapping, events = gemm
    events = {key: list(row) for key, row in events.items()}
    merge(events, bias_events(m, layer.n, direction))
    return price(hw, rows[0][0], spec, events), mapping, events


def between_rows(hw: HWConfig, ops) -> list[tuple]:
    """Ledger rows of a layer's ops between the GEMMs (`fqtsim.simulation.between.Around`):
    `between` forward, `between_grad` backward (their repeats counted in their shapes)."""
    spec = GemmSpec(FORWARD_BITS, FORWARD_BITS)
    return [row for name, events in (("between", ops.forward), ("between_grad", ops.backward))
            if events for row in price(hw, name, spec, events)]


def _forward(hw, layers, batch, range_policy, windows, ops=None) -> list:
    """The forward GEMMs of a step, bottom up: each but the top one hands its output off at
    full width, to the next layer's activation quantizer (per tensor, to nearest, under the
    step's range policy, the GEMM's tiling deciding where the wide activation lives) or to the
    pass of an op between them (`ops`: `fqtsim.simulation.between.Around` per layer), which
    then writes the codes; the first layer reads codes made once from the data; the top one
    writes its codes fused, or its logits wide for the loss's pass."""
    from fqtsim.simulation.between import NONE

    ops = ops or [NONE] * len(layers)
    outputs, producer, handoffs = [], None, {}
    for i, layer in enumerate(layers):
        if layer.kind == "embedding":   # a lookup, no GEMM: its chain writes the next codes
            outputs.append(None)
            continue
        top = i == len(layers) - 1
        scheme = None if i == 0 else activation_scheme(range_policy, producer,
                                                       coded=ops[i - 1].x_coded)
        to_quantizer = not top and not ops[i].y_read
        out = _priced(hw, layer.gemms(batch)[0], layer.n, layer.k, FORWARD_BITS, FORWARD_BITS,
                      writeback="fused" if top and not ops[i].y_read else "handoff",
                      a_quant=scheme, a_offset=True, b_offset=not layer.weights,
                      a_im2col=windows[i],
                      consumer=activation_consumer(range_policy) if to_quantizer else None,
                      b_sums_known=bool(layer.weights), name="output")
        if layer.b_source is not None:   # B quantized from the wide output of its source
            out = _with_events(hw, out, _operand_events(hw, layer, range_policy,
                                                       handoffs[layer.b_source]))
        outputs.append(out)
        producer = handoffs[layer.name] = produced_by(_tiling(out[1]), layer.n, layer.group_rows)
    return outputs


def _operand_events(hw: HWConfig, layer, range_policy: str, producer) -> dict:
    """Raw events of quantizing a weightless layer's B operand (K x N per GEMM) from the wide
    output of `layer.b_source`, which `producer` wrote: 8-bit, per tensor, to nearest, as
    its A operand is; charged with its forward GEMM."""
    return input_events(hw, None, activation_scheme(range_policy, producer), layer.k, layer.n,
                        FORWARD_BITS)


def _with_events(hw, gemm: tuple, more: dict) -> tuple:
    """A priced forward GEMM (rows, mapping, events) with `more` raw events priced with it."""
    rows, mapping, events = gemm
    events = {key: list(row) for key, row in events.items()}
    merge(events, more)
    return price(hw, rows[0][0], GemmSpec(FORWARD_BITS, FORWARD_BITS), events), mapping, events


def _level(events: dict, event: str) -> str | None:
    """The memory level `event` happened at (None if it did not)."""
    return next((level for ev, level in events if ev == event and level in ("tcm", "ddr")), None)


def mappings(hw: HWConfig, model, batch: int, quantizer: str = "psq",
             range_policy: str = "dynamic", grad_bits: int = 8, weights: str = "fp32",
             momentum: str = "fp32", momentum_block: int = DEFAULT_BLOCK) -> pd.DataFrame:
    """How each GEMM of a training step is laid onto the device (arguments as for
    `training_step`): one row per layer and GEMM with its shape (A is M x K), loop order, TCM
    tiles, which operands are held whole, the TCM the tiles take and leave, and where the output
    goes."""
    formats = state_formats(weights, momentum, momentum_block)
    return _training_step(hw, model, batch, quantizer, range_policy, grad_bits, formats)[1].copy()


def _tiling(mp: dict) -> Tiling:
    """The tiling a GEMM was laid out by, from its mapping (`gemm`'s attrs["mapping"])."""
    loops = mp["loop_order"]
    return Tiling(mp["tile_m"], mp["tile_n"], mp["tile_k"], tuple(loops.replace("k", "")),
                  mp["tcm_bytes"], mp["tcm_free"], mp["a_whole"], mp["b_whole"],
                  loops.find("k") % 3 if "k" in loops else 2, None if mp["psums"] == "-" else mp["psums"])


def check_training(hw: HWConfig, layers, batches, quantizer: str = "psq",
                   range_policy: str = "dynamic", grad_bits: int = 8, backward: bool = True,
                   what: str = "hw", hint: str = "a smaller --batch-size",
                   formats=FP32_STATE) -> None:
    """Plan every GEMM of a training step of `layers` at each batch size in `batches` (the
    training batches and the evaluation pass) and raise one ValueError, naming the config and
    what to change, if any of them cannot run on `hw` (tiles that cannot fit TCM beside the
    optimizer state stored in `formats`, operand widths the MACs do not take). `backward`:
    False for QAT (forward GEMMs on the device only)."""
    for batch in sorted(set(batches), reverse=True):
        try:
            if backward:
                training_step(hw, layers, batch, quantizer, range_policy, grad_bits,
                              **formats.names())
            else:
                _forward(hw, list(layers), batch, range_policy,
                         [None if layer.im2col is None else replace(layer.im2col, samples=batch)
                          for layer in layers])
        except ValueError as e:
            raise ValueError(f"{what}: {hw.name} cannot run this training (at {batch} samples per "
                             f"GEMM): {e}; pick another config" + (f" or {hint}" if hint else "")) from None
