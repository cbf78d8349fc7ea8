"""How a GEMM is laid onto the device: storage widths, TCM tiles and the loop nest's reuse rules.

The loop nest, written down once (the device walks it, `fqtsim.simulation.cost` sums it in closed form):

    for o in outer tiles:              # loop_order[0]: n (column folds outer) or m
      for i in inner tiles:            # loop_order[1]
        for t in k tiles:              # K innermost
          load A[m-tile, t] unless it is the A tile already in TCM
          load B[t, n-tile] unless it is the B tile already in TCM
          the array runs ceil(tm/rows) * ceil(tn/cols) folds over the tile's K slice
          several folds and more K tiles to come: park the folds' sums in TCM (psum_spill)
        write back the (tm x tn) output tile (after adding the parked sums: psum_drain)

The K loop may also sit between the output loops or outside both (`loop_order: [n, k, m]`,
`[k, m, n]`, ...: reduction outer). Each iteration then visits one output tile for one K tile,
and the sums of every output tile visited before its next visit (a band of tiles, or all of
them) wait between visits: in TCM where they fit what the tiles leave, else in DDR (written on
the first visit, read and written on the others, read out on the last before the write-back).
An operand tile is loaded whenever it differs from the last one loaded, so it is reloaded once
per iteration of the loops down to the innermost one it depends on (`reloads`): B is reused
across an inner m loop, A across an inner n loop.

Array cycles: a fold over a K slice of sk takes sk cycles, plus rows + cols - 2 (`fill_drain`)
each time the array starts it: the operands enter skewed, so the far corner PE starts (the
fill) and finishes (before the sums drain) that much after the near one. A fold starts
whenever its sums are not already in the accumulators: on each new output tile, and on each
K tile when several folds take turns over a split K (their sums are parked between K tiles)
or when K is not innermost (each visit restarts every fold of the tile, its sums coming back
from where they waited). One fold per tile with K
innermost streams all its K tiles through the same accumulators and fills and drains once
(`fold_starts`). Spills to the partial-sum buffer do not restart a fold. The next fold's fill
does not overlap the last one's drain, double buffered or not (SCALE-Sim 3.0.0 counts a GEMM
the same way: folds x (K + rows + cols - 2) cycles); a partial fold pays the whole array's.

A (M x K) and B (K x N) live in DDR; TCM holds one A tile, one B tile and one output tile (twice
each with double buffering: the second copy is the prefetch slot, not extra reuse). An operand that
fits its buffer whole is held whole instead, once (no prefetch slot: nothing follows it), and stays
resident across the loop nest: each of its tiles is loaded on first use only. With one fold per
tile (tm <= rows, tn <= cols) the accumulators stay in the array over all K tiles; with several,
each K tile's sums are parked in the output tile's TCM at `wide_bits` and read back by the next,
which leaves the results exact only where the accumulator wraps (and does not spill) or spills
at the K tiles' ends anyway (`k_split_ok`); a saturating accumulator keeps one fold per K tile.

Buffers: TCM is one pool (`tcm.partitions: null`), shared by the tiles and held operands, the
rest free for wide outputs; or fixed partitions for A, B and the output tiles (with their
partial sums), the output partition's rest and any unpartitioned TCM free for wide outputs.

Producer and consumer (the rule, once): a wide gradient lives where the GEMM that writes it (its
producer: the layer above's grad_input, handing its output off at accumulator width, or the
loss for the top layer) leaves room, judged with the producer's tiles (`produced_by`): TCM if
the part of it that is alive at once fits the TCM the producer's tiles leave free, else DDR.
Min/max can be tracked in any output pipeline (a register pair per sample); what needs whole
rows is the requantization, so PSQ's live part is the whole samples the producer completes at
a time (bands of its row tiles when m is outer or one column tile spans all columns), and
PTQ's and BHQ's is the whole tensor. The mapper lays out a producer knowing its consumer
(`fqtsim.simulation.cost.layout`): the best tiling that keeps that live part in TCM is among
those priced.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np

from fqtsim.hardware.hw import HWConfig


def container_bits(bits: int) -> int:
    """Storage width of a `bits`-wide value: the next power of two, packed (4-bit codes two a byte)."""
    return 1 << (bits - 1).bit_length()


def nbytes(count: int, bits: int) -> float:
    """Bytes taken by `count` values of `bits` bits stored in their containers (exact in float64)."""
    return count * container_bits(bits) / 8


# fused: b-bit codes requantized in the output pipeline; materialized: full width to TCM or DDR;
# handoff: kept at full width for the next quantizer (whose wide_write stores it) or the pass of
# an op between the GEMMs.
WRITEBACKS = ("fused", "materialized", "handoff")


def stored_output_bits(hw: HWConfig, writeback: str, out_bits: int) -> int:
    """Width at which a GEMM's output leaves the array: b-bit codes (fused), else at full width
    in the config's wide format."""
    return out_bits if writeback == "fused" else wide_store_bits(hw)


def wide_bits(hw: HWConfig) -> int:
    """Width of a GEMM's raw result: the partial sum when the accumulator spills, else the accumulator."""
    acc = hw.accumulator
    return acc.psum_bits if acc.spill_every is not None else acc.bits


WIDE_FORMAT_BITS = {"fp32": 32, "bf16": 16}


def wide_store_bits(hw: HWConfig) -> int:
    """Width of a tensor written out at full width (a wide gradient, a materialized output):
    the raw sums (`wide_bits`), or scaled to fp32 or bf16 on the way out (`pipeline.wide_format`).
    Partial sums stay raw."""
    return WIDE_FORMAT_BITS.get(hw.pipeline.wide_format, wide_bits(hw))


@dataclass(frozen=True)
class Tiling:
    """TCM tile sizes for one GEMM, the order of its output loops (outer first) and where the K
    loop sits among them (`k_at`: 2 innermost, 1 between them, 0 outermost), whether A and B are
    held whole, the TCM they take and the TCM left for wide outputs; with K not innermost, where
    the output tiles' partial sums wait between their visits (`psums`: tcm or ddr)."""
    tm: int
    tn: int
    tk: int
    order: tuple
    footprint: int
    free: int
    a_whole: bool = False
    b_whole: bool = False
    k_at: int = 2
    psums: str | None = None

    def tile_counts(self, m: int, n: int, k: int) -> tuple[int, int, int]:
        return math.ceil(m / self.tm), math.ceil(n / self.tn), math.ceil(k / self.tk)

    @property
    def key(self) -> tuple:
        """The tiling as a plain tuple that sorts: ties between estimates never fall to hash
        order (dataclasses.astuple, which copies deep, is slow in the mapper's inner loop)."""
        return (self.tm, self.tn, self.tk, self.order, self.footprint, self.free, self.a_whole,
                self.b_whole, self.k_at, self.psums or "")

    @property
    def loops(self) -> tuple:
        """All three loops, outer first."""
        loops = list(self.order)
        loops.insert(self.k_at, "k")
        return tuple(loops)

    @property
    def name(self) -> str:
        """The loop order as the mapping tables show it: "nm" with K innermost, else e.g. "nkm"."""
        return "".join(self.order) if self.k_at == 2 else "".join(self.loops)


def buffers(hw: HWConfig) -> int:
    """Copies of each tile in TCM: two with double buffering (the second is the prefetch slot)."""
    return 2 if hw.mapping.double_buffer else 1


def buffer_bytes(hw: HWConfig, m, n, k, tm, tn, tk, a_bits, b_bits, out_bits, a_whole=False,
                 b_whole=False, a_win=None, b_win=None) -> tuple[int, int, int]:
    """TCM bytes of A (its tiles, or all of it held whole, once), of B, and of the output tiles
    (with their partial sums when the accumulator spills or parks them between K tiles). An
    operand built on chip from a feature map (`a_win`, `b_win`: its `fqtsim.hardware.conv.Im2col`)
    takes its largest tile's input elements, or the whole map's."""
    copies = buffers(hw)
    buf_bits = out_bits
    if hw.accumulator.spill_every is not None or parks_psums(hw, tm, tn, tk, k):
        buf_bits = max(buf_bits, wide_bits(hw))  # partial sums live in the output tile
    if a_win is None:
        a = nbytes(m * k, a_bits) if a_whole else copies * nbytes(tm * tk, a_bits)
    else:
        a = nbytes(a_win.elements if a_whole else copies * _largest_window(a_win, tm, tk), a_bits)
    if b_win is None:
        b = nbytes(k * n, b_bits) if b_whole else copies * nbytes(tk * tn, b_bits)
    else:
        b = nbytes(b_win.elements if b_whole else copies * _largest_window(b_win, tk, tn), b_bits)
    return math.ceil(a), math.ceil(b), math.ceil(copies * nbytes(tm * tn, buf_bits))


@functools.lru_cache(maxsize=65536)
def _largest_window(win, rows: int, cols: int) -> int:
    """Input elements of the largest tile of `rows` x `cols` of an on-chip im2col matrix."""
    return int(win.row_tiles(rows).each.max()) * int(win.col_tiles(cols).each.max())


def whole_bytes(win, rows: int, cols: int, bits: int) -> float:
    """DDR bytes of an operand loaded once: its matrix, or the feature map it is built from."""
    return nbytes(rows * cols if win is None else win.elements, bits)


def placement(hw: HWConfig, use: tuple[int, int, int]) -> tuple[bool, int, int]:
    """Whether buffers of `use` bytes (A, B, output) fit the TCM, the bytes they take, and the
    bytes left for wide outputs."""
    capacity, parts = hw.tcm.size_bytes, hw.tcm.partitions
    taken = sum(use)
    if parts is None:
        return taken <= capacity, taken, capacity - taken
    sizes = parts.sizes_bytes
    fits = all(u <= p for u, p in zip(use, sizes))
    return fits, taken, capacity - sum(sizes) + sizes[2] - use[2]


@functools.lru_cache(maxsize=8192)
def operand_tiles(tiling: Tiling, m: int, n: int, k: int, a_bits: int, b_bits: int, a_win=None,
                  b_win=None) -> dict:
    """With K innermost: A's tiles along m and B's along n as classes (size, count, first, bytes,
    new bytes): the DDR bytes one tile moves when loaded with all its K tiles, and those it adds
    on first use when its operand is held whole (`loop_units` summed over K)."""
    units = loop_units(tiling, m, n, k, a_win, b_win)
    k_sums = [tuple(sum(c * u[i][j] for _, c, _, _, *u in units["k"]) for j in (0, 1))
              for i in (0, 1)]
    return {dim: [(s, c, f, nbytes(each * k_sums[i][0], bits), nbytes(new * k_sums[i][1], bits))
                  for s, c, f, _, (each, new) in units[dim]]
            for i, (dim, bits) in enumerate((("m", a_bits), ("n", b_bits)))}


@functools.lru_cache(maxsize=8192)
def loop_units(tiling: Tiling, m: int, n: int, k: int, a_win=None, b_win=None) -> dict:
    """Each loop's tiles as classes (size, count, first, last, units of A and/or B): what one
    tile of that loop's index contributes to an operand tile, as (on every load, new when the
    operand is held whole): rows or columns of a plain matrix, pixels or channels of an im2col
    one. An operand tile moves the product of its two loops' units."""
    m_dim = _dim(m, tiling.tm, a_win, a_win and a_win.row_tiles)
    n_dim = _dim(n, tiling.tn, b_win, b_win and b_win.col_tiles)
    if a_win is not None:
        k_a = _dim(k, tiling.tk, a_win, a_win.col_tiles)
        k_dims = (k_a, (k_a[0], k_a[1], k_a[0], k_a[0]))
    elif b_win is not None:
        k_b = _dim(k, tiling.tk, b_win, b_win.row_tiles)
        k_dims = ((k_b[0], k_b[1], k_b[0], k_b[0]), k_b)
    else:
        k_dims = (_dim(k, tiling.tk),) * 2
    k_units = [np.stack([d[2], d[3]], axis=1) for d in k_dims]
    return {"m": _loop_classes(m_dim[0], m_dim[1], np.stack(m_dim[2:], axis=1)),
            "n": _loop_classes(n_dim[0], n_dim[1], np.stack(n_dim[2:], axis=1)),
            "k": _loop_classes(k_dims[0][0], k_dims[0][1], *k_units)}


def _dim(size: int, tile: int, win=None, tiles=None) -> tuple:
    """(tile sizes, counts, units each, units new) of one loop, the first tile in the first
    class, the last tile alone in the last: from the im2col's tiles, else plain."""
    if win is not None:
        t = tiles(tile)
        return t.size, t.count, t.each, t.new
    count = -(-size // tile)
    sizes = np.array([tile, size - (count - 1) * tile] if count > 1 else [size])
    counts = np.array([count - 1, 1] if count > 1 else [1])
    return sizes, counts, sizes, sizes


def _loop_classes(size, count, *units) -> list[tuple]:
    """(size, count, first, last, *units as (each, new)) classes: the first tile, the last,
    and the rest grouped by what they move."""
    def row(i, c, first, last):
        return (int(size[i]), c, first, last, *((float(u[i, 0]), float(u[i, 1])) for u in units))
    if int(np.sum(count)) == 1:
        return [row(0, 1, True, True)]
    count = np.array(count)
    count[0] -= 1
    count[-1] -= 1
    keep = np.flatnonzero(count > 0)
    table = np.column_stack([size[keep], *(u[keep] for u in units)])
    groups, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    totals = np.bincount(inverse.ravel(), weights=count[keep], minlength=len(groups))
    middle = [row(keep[i], int(c), False, False) for i, c in zip(first, totals)]
    return [row(0, 1, True, False), *middle, row(len(size) - 1, 1, False, True)]


def operand_loads(tiling: Tiling, m: int, n: int, k: int, a_bits: int, b_bits: int, a_win=None,
                  b_win=None) -> tuple[float, float]:
    """DDR bytes of A and of B loaded over the whole loop nest, by the reuse rule above."""
    trips = dict(zip("mnk", tiling.tile_counts(m, n, k)))
    a_once, b_once = nbytes(m * k, a_bits), nbytes(k * n, b_bits)
    if a_win is not None:   # each m tile's windows, in every channel its K tiles touch
        a_once = nbytes(a_win.row_tiles(tiling.tm).total * a_win.col_tiles(tiling.tk).total, a_bits)
    if b_win is not None:
        b_once = nbytes(b_win.row_tiles(tiling.tk).total * b_win.col_tiles(tiling.tn).total, b_bits)
    a = a_once * reloads(tiling.loops, "mk", trips)
    b = b_once * reloads(tiling.loops, "kn", trips)
    if tiling.a_whole:
        a = whole_bytes(a_win, m, k, a_bits)
    if tiling.b_whole:
        b = whole_bytes(b_win, k, n, b_bits)
    return a, b


def reloads(loops: tuple, dims: str, trips: dict) -> int:
    """How many times an operand indexed by `dims` is loaded whole over the loop nest `loops`
    (outer first) with these trip counts, a tile being loaded whenever it differs from the last:
    once per iteration of the loops down to the innermost one it depends on, divided by its
    own tiles. Loops of one trip change nothing."""
    deepest = max((i for i, loop in enumerate(loops) if loop in dims and trips[loop] > 1), default=-1)
    return math.prod(trips[loop] for loop in loops[:deepest + 1] if loop not in dims)


def loaded(loops: tuple, dims: str, trips: dict, first: dict) -> bool:
    """Whether an iteration (`first[loop]`: it is the loop's first trip) loads the operand's tile:
    iff every loop below the innermost one it depends on is at its first trip."""
    deepest = max((i for i, loop in enumerate(loops) if loop in dims and trips[loop] > 1), default=-1)
    return all(first[loop] for loop in loops[deepest + 1:]) if deepest >= 0 else all(first.values())


def restarts_ok(hw: HWConfig, tk: int, k: int) -> bool:
    """Whether the accumulators may restart at every K tile, their sums waiting in TCM or DDR
    between visits (K not innermost): exact where the accumulator wraps without spilling, or
    spills at the K tiles' ends anyway."""
    acc = hw.accumulator
    if tk >= k:
        return True
    return acc.overflow == "wrap" if acc.spill_every is None else tk % acc.spill_every == 0


def plan(hw: HWConfig, m: int, n: int, k: int, a_bits: int, b_bits: int, out_bits: int,
         a_win=None, b_win=None) -> Tiling:
    """The tiling with the fewest estimated cycles, then DDR bytes, of `plans`."""
    return plans(hw, m, n, k, a_bits, b_bits, out_bits, a_win, b_win)[0]


@functools.lru_cache(maxsize=4096)
def plans(hw: HWConfig, m: int, n: int, k: int, a_bits: int, b_bits: int, out_bits: int,
          a_win=None, b_win=None) -> tuple[Tiling, ...]:
    """The tilings a GEMM may run with, best estimate first (fewest cycles, then DDR bytes): tiles
    (and the loop order) from the config where given, else every fitting size searched; an
    operand is held whole where that fits (with partitions, always; in a pool, where it pays).
    `a_win`, `b_win`: the `fqtsim.hardware.conv.Im2col` of an operand built on chip from a feature map,
    or None. `fqtsim.simulation.cost.layout` picks among them by the config's `mapping.objective`."""
    mp, arr = hw.mapping, hw.array

    if mp.loop_order is None:   # every order: K innermost, between the output loops, outermost
        orders = [(o, k_at) for o in (("n", "m"), ("m", "n")) for k_at in (2, 1, 0)]
    else:
        loops = tuple(mp.loop_order)
        orders = [(tuple(d for d in loops if d != "k"), loops.index("k") if "k" in loops else 2)]
    parts = hw.tcm.partitions
    if parts is None:   # in a pool, holding an operand whole competes with the tiles: try both
        a_wholes, b_wholes = ((False, True) if whole_bytes(win, r, c, bits) <= hw.tcm.size_bytes
                              else (False,) for win, r, c, bits in ((a_win, m, k, a_bits),
                                                                    (b_win, k, n, b_bits)))
    else:               # a partition holds its operand whole whenever it can (ZigZag's rule)
        a_wholes = (whole_bytes(a_win, m, k, a_bits) <= parts.sizes_bytes[0],)
        b_wholes = (whole_bytes(b_win, k, n, b_bits) <= parts.sizes_bytes[1],)

    def options(tm, tn, tk):
        """The tilings of these tile sizes that fit."""
        out = []
        for a_whole in a_wholes:
            for b_whole in b_wholes:
                use = buffer_bytes(hw, m, n, k, tm, tn, tk, a_bits, b_bits, out_bits, a_whole,
                                   b_whole, a_win, b_win)
                fits, taken, free = placement(hw, use)
                if fits:
                    out += [t for order, k_at in orders if (t := _with_k(
                        hw, Tiling(tm, tn, tk, order, taken, free, a_whole, b_whole), k_at, m, n, k))]
        return out

    def ranked(t):   # the estimate, then the tiling itself: ties never fall to hash order
        return _score(hw, t, m, n, k, a_bits, b_bits, a_win, b_win), t.key

    def split_ok(tm, tn, tk):
        return k_split_ok(hw, tm, tn, tk, k)   # results stay exact with these tiles

    if None not in (mp.tile_m, mp.tile_n, mp.tile_k):
        tm, tn, tk = min(mp.tile_m, m), min(mp.tile_n, n), min(mp.tile_k, k)
        if not split_ok(tm, tn, tk):
            raise ValueError(f"{hw.name}: mapping.tile_k = {tk} < K = {k} with several folds per "
                             f"tile parks partial sums in TCM between K tiles, which would change "
                             f"what a {hw.accumulator.overflow} accumulator computes"
                             f"{_split_rule(hw)}; or make tile_m <= array.rows ({arr.rows}) and "
                             f"tile_n <= array.cols ({arr.cols})")
        if orders[0][1] < 2 and not restarts_ok(hw, tk, k):
            raise ValueError(f"{hw.name}: mapping.loop_order {list(mp.loop_order)} leaves the "
                             f"output tiles between K tiles of {tk} < K = {k}, and restarting a "
                             f"{hw.accumulator.overflow} accumulator there would change what it "
                             f"computes{_split_rule(hw)}; put k last or set tile_k to null")
        fitting = options(tm, tn, tk)
        if not fitting:
            use = buffer_bytes(hw, m, n, k, tm, tn, tk, a_bits, b_bits, out_bits, a_win=a_win,
                               b_win=b_win)
            raise ValueError(f"{hw.name}: tiles {tm}x{tn}x{tk} for GEMM {m}x{k}x{n} need "
                             f"{sum(use)} B of TCM (A {use[0]}, B {use[1]}, output {use[2]}), "
                             f"{_room(hw)}; make mapping.tile_m/tile_n/tile_k smaller or set "
                             f"them to null")
        return tuple(sorted(fitting, key=ranked))

    # tiles narrower than the array only help an accumulator that cannot park partial sums
    # between K tiles (they give it longer K slices); a wrapping one splits K instead
    acc = hw.accumulator
    narrow = acc.overflow != "wrap" or acc.spill_every is not None

    def choices(given, dim, step):
        if given is not None:
            return {min(given, dim)}
        sizes = {step << i for i in range(dim.bit_length() + 1)}
        if narrow:
            sizes |= {1 << i for i in range(dim.bit_length())}
        if dim == m and a_win is not None:   # bands of whole output rows, and whole samples
            sizes |= {band << i for band in (a_win.out_w, a_win.positions)
                      for i in range(max(1, (dim // band).bit_length()))}
        return {min(dim, s) for s in sizes}

    tks = {min(mp.tile_k, k)} if mp.tile_k is not None else {k}
    candidates = [t for tk in tks for tm in choices(mp.tile_m, m, arr.rows)
                  for tn in choices(mp.tile_n, n, arr.cols) if split_ok(tm, tn, tk)
                  for t in options(tm, tn, tk)]
    if mp.tile_k is None:  # K does not fit whole: tiles with the longest K slice that fits
        pairs = {(tm, tn) for tm in choices(mp.tile_m, m, arr.rows) for tn in choices(mp.tile_n, n, arr.cols)}
        if narrow and not mp.tile_m:   # one fold per tile: every width up to the array's
            pairs |= {(tm, tn) for tm in choices(None, min(m, arr.rows), 1) for tn in choices(mp.tile_n, n, arr.cols)}
        if narrow and not mp.tile_n:
            pairs |= {(tm, tn) for tm, _ in list(pairs) for tn in choices(None, min(n, arr.cols), 1)}
        spill = hw.accumulator.spill_every
        for tm, tn in sorted(pairs):
            multi = tm > arr.rows or tn > arr.cols
            if multi and spill is None and hw.accumulator.overflow != "wrap":
                continue   # a saturating accumulator cannot restart at K tiles (k_split_ok)
            step = spill if multi and spill is not None else 1   # K tiles end on spill points
            if a_win is not None and k > a_win.taps:   # K tiles of whole channels
                step = math.lcm(step, a_win.taps)
            if b_win is None:
                tk = _longest_k(hw, m, n, k, tm, tn, a_bits, b_bits, out_bits, a_win) // step * step
                while tk >= 1 and not options(tm, tn, tk):  # packed sub-byte tiles, held operands
                    tk -= step
            else:   # windows grow unevenly with the K slice: the longest that fits, by bisection
                slices = _k_slices(k, step, b_win)
                lo, hi = -1, len(slices) - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if options(tm, tn, slices[mid]) else (lo, mid - 1)
                tk = slices[lo] if lo >= 0 else 0
            if tk >= 1:
                candidates += options(tm, tn, tk)
    if not candidates:
        big = [f"mapping.{f} = {v}" for f, v, a in (("tile_m", mp.tile_m, arr.rows),
                                                       ("tile_n", mp.tile_n, arr.cols)) if v and v > a]
        why = (f"; {' and '.join(big)} exceed the array, which forces all of K into one tile: "
               f"set them to null") if big else "; raise tcm.size_kib or use a smaller GEMM"
        if mp.loop_order is not None and orders[0][1] < 2 and not restarts_ok(hw, 1, k):
            why += (f", or put k last in mapping.loop_order {list(mp.loop_order)}: with K outside "
                    f"an output loop a {hw.accumulator.overflow} accumulator cannot split K"
                    f"{_split_rule(hw)}")
        raise ValueError(f"{hw.name}: no tiling of GEMM {m}x{k}x{n} ({a_bits}x{b_bits}-bit "
                         f"operands) fits {_room(hw)} even with one fold per tile{why}")
    return tuple(sorted(set(candidates), key=ranked))


def _with_k(hw: HWConfig, t: Tiling, k_at: int, m: int, n: int, k: int) -> Tiling | None:
    """`t` with its K loop at `k_at`: the partial sums alive at once (a band of output tiles, the
    inner loop's whole dimension, with K between the output loops; every output with K
    outermost) in TCM if they fit what the tiles leave, else DDR. K innermost is `t` itself; so
    is one K tile (where the K loop changes nothing) under a given order, while a search skips
    it as a duplicate (None); None too where restarting the accumulators at K tiles would
    change the results."""
    if k_at == 2:
        return t
    if t.tk >= k:   # searched: the same as K innermost; given: honoured as that
        return t if hw.mapping.loop_order is not None else None
    if not restarts_ok(hw, t.tk, k):
        return None
    band = m * n if k_at == 0 else (t.tm * n if t.order[0] == "m" else m * t.tn)
    live = math.ceil(nbytes(band, wide_bits(hw)))
    at, free = ("tcm", t.free - live) if live <= t.free else ("ddr", t.free)
    return Tiling(t.tm, t.tn, t.tk, t.order, t.footprint, free, t.a_whole, t.b_whole, k_at, at)


def _k_slices(k: int, step: int, b_win) -> list[int]:
    """K slices shorter than K to try, ascending: multiples of `step`; along an im2col B's
    positions (a weight gradient's reduction), powers of two and bands of whole output rows."""
    if b_win is None:
        return list(range(step, k, step))
    bands = {band << i for band in (1, b_win.out_w, b_win.positions) for i in range(k.bit_length())}
    return sorted(s for s in bands if s < k and s % step == 0)


def k_split_ok(hw: HWConfig, tm: int, tn: int, tk: int, k: int) -> bool:
    """Whether a tile may split K. One fold per tile keeps its accumulators in the array; with
    several, each fold's sums are parked in TCM between K tiles (at `wide_bits`), which leaves
    the results as they are where the accumulator wraps without spilling (sums mod 2^bits add
    up in any grouping) or spills anyway at the K tiles' ends (tk a multiple of spill_every)."""
    if tk >= k or (tm <= hw.array.rows and tn <= hw.array.cols):
        return True
    acc = hw.accumulator
    return acc.overflow == "wrap" if acc.spill_every is None else tk % acc.spill_every == 0


def parks_psums(hw: HWConfig, tm: int, tn: int, tk: int, k: int) -> bool:
    """Several folds per tile over a split K, no spills: partial sums wait in TCM between K tiles."""
    return (hw.accumulator.spill_every is None and tk < k
            and (tm > hw.array.rows or tn > hw.array.cols))


def _split_rule(hw: HWConfig) -> str:
    acc = hw.accumulator
    if acc.spill_every is not None:
        return f" unless tile_k is a multiple of accumulator.spill_every ({acc.spill_every})"
    return "" if acc.overflow == "wrap" else " (saturation depends on where sums restart)"


def _longest_k(hw: HWConfig, m, n, k, tm, tn, a_bits, b_bits, out_bits, a_win=None) -> int:
    """An upper estimate of the longest K slice whose A and B tiles fit beside the output tiles
    (an im2col A: its windows' pixels per channel, shared by the channel's kernel taps)."""
    copies, parts = buffers(hw), hw.tcm.partitions
    out_tiles = buffer_bytes(hw, m, n, k, tm, tn, 0, a_bits, b_bits, out_bits)[2]
    a_rows = tm if a_win is None else _largest_window(a_win, tm, 1) / a_win.taps
    if parts is None:
        room = (hw.tcm.size_bytes - out_tiles) / (copies * (nbytes(a_rows, a_bits) + nbytes(tn, b_bits)))
    else:
        room = min(parts.sizes_bytes[0] / (copies * nbytes(a_rows, a_bits)),
                   parts.sizes_bytes[1] / (copies * nbytes(tn, b_bits)))
    return min(k - 1, int(room))


def _room(hw: HWConfig) -> str:
    parts = hw.tcm.partitions
    if parts is None:
        return f"{hw.tcm.size_bytes} B of TCM"
    a, b, out = parts.sizes_bytes
    return f"tcm.partitions of A {a} B, B {b} B, output {out} B"


def ddr_estimate(hw: HWConfig, t: Tiling, m, n, k, a_bits, b_bits, a_win=None, b_win=None) -> float:
    """DDR bytes of the operands and of partial sums waiting in DDR (outputs aside)."""
    ddr = sum(operand_loads(t, m, n, k, a_bits, b_bits, a_win, b_win))
    if t.psums == "ddr":   # every visit but the first reads the sums back, every one writes them
        ddr += 2 * t.tile_counts(m, n, k)[2] * nbytes(m * n, wide_bits(hw))
    return ddr


def _score(hw: HWConfig, t: Tiling, m, n, k, a_bits, b_bits, a_win=None, b_win=None):
    """Estimated cycles first (idle lanes cost time), then DDR bytes, then fewer tiles, less TCM."""
    ddr = ddr_estimate(hw, t, m, n, k, a_bits, b_bits, a_win, b_win)
    nm, nn, nk = t.tile_counts(m, n, k)
    arr = hw.array
    folds = _folds(m, t.tm, arr.rows) * _folds(n, t.tn, arr.cols)
    if t.k_at < 2 and nk > 1:   # every visit restarts every fold
        starts = folds * nk
    else:
        starts = sum(cm * cn * fold_starts(hw, sm, sn, nk)
                     for sm, cm in _tile_sizes(m, t.tm) for sn, cn in _tile_sizes(n, t.tn))
    compute = folds * k + starts * fill_drain(hw)
    memory = ddr / hw.ddr.bytes_per_cycle
    cycles = max(compute, memory) if hw.mapping.double_buffer else compute + memory
    return cycles, ddr, nm * nn * nk, t.footprint, t.tm, t.tn


def _tile_sizes(dim: int, tile: int) -> list[tuple[int, int]]:
    """(size, count) of the full tiles along one dimension and of the last, shorter one."""
    full, rest = divmod(dim, tile)
    return [(size, count) for size, count in ((tile, full), (rest, 1)) if size and count]


def _folds(dim: int, tile: int, lanes: int) -> int:
    """Array folds along one dimension: its full tiles' and the last, shorter one's."""
    full, rest = divmod(dim, tile)
    return full * -(-tile // lanes) + -(-rest // lanes)


def live_wide_elements(scope: str, tiling: Tiling, m: int, n: int, rows_per_sample: int = 1) -> int:
    """Wide output elements of this GEMM held at once until a range scope is complete: whole
    rows complete band by band only with m outer or one column tile (see `produced_by`);
    otherwise, as for a "tensor" scope, the whole output."""
    samples = produced_by(tiling, n, rows_per_sample).samples_at_once
    if scope == "rows" and samples is not None:
        return min(samples * rows_per_sample, m) * n
    return m * n


@dataclass(frozen=True)
class Producer:
    """What decides a wide gradient's home, of whatever writes it: the TCM bytes it leaves free
    and how many whole samples it completes at a time (None: no row is complete before its end)."""
    free: int
    samples_at_once: int | None


def produced_by(tiling: Tiling, n: int, rows_per_sample: int = 1) -> Producer:
    """A GEMM writing an output of `n` columns tile by tile: with m outer (or one column tile)
    it completes bands of tm rows, whole samples; with column tiles outer, rows end together."""
    if tiling.order[0] == "m" or tiling.tn >= n:
        return Producer(tiling.free, -(-tiling.tm // rows_per_sample))
    return Producer(tiling.free, None)


def by_columns(producer: Producer) -> Producer:
    """The same producer, seen by a quantizer with a range per column of what it wrote (the
    weight-gradient GEMM's, per output feature): no column is complete before its end."""
    return Producer(producer.free, None)


def loss_producer(hw: HWConfig) -> Producer:
    """The loss gradient (softmax minus one-hot, on the vector unit): no GEMM's tiles beside it,
    one sample at a time."""
    return Producer(hw.tcm.size_bytes, 1)


def wide_level(hw: HWConfig, tiling: Tiling, live_elements: int) -> str:
    """Where a tensor written at full width lands: TCM if its live part fits beside the
    tiles, else DDR."""
    return "tcm" if nbytes(live_elements, wide_store_bits(hw)) <= tiling.free else "ddr"


def phase_stalls(hw: HWConfig, compute: float, ddr_bytes: float, tcm_read: float,
                 tcm_write: float) -> tuple[float, float]:
    """Cycles one output-tile phase waits on DDR and on TCM beyond its `compute` cycles.

    Operands stream from TCM while the array computes (separate read and write ports). With
    double buffering, the DDR transfers of a phase overlap its compute and the phase takes the
    longest of the three; without, the DDR transfers come first.
    """
    ddr = ddr_bytes / hw.ddr.bytes_per_cycle
    tcm = max(tcm_read / hw.tcm.read_bytes_per_cycle, tcm_write / hw.tcm.write_bytes_per_cycle)
    if hw.mapping.double_buffer:
        stall = max(compute, ddr, tcm) - compute
        return (stall, 0.0) if ddr >= tcm else (0.0, stall)
    return ddr, max(compute, tcm) - compute


def fill_drain(hw: HWConfig) -> int:
    """Cycles a fold of the output-stationary array spends beyond its K slice: its operands
    enter skewed, so the far corner PE starts and finishes rows + cols - 2 cycles after the near
    one (SCALE-Sim's count of fill and drain; it charges the whole array for a partial fold)."""
    return hw.array.rows + hw.array.cols - 2


def fold_starts(hw: HWConfig, sm: int, sn: int, k_tiles: int) -> int:
    """Times the array starts a fold of an sm x sn output tile whose K is streamed in `k_tiles`
    tiles, K innermost: one fold keeps its accumulators in the array over all of them, so it
    starts once; several take turns and each restarts on every K tile."""
    folds = -(-sm // hw.array.rows) * -(-sn // hw.array.cols)
    return folds * k_tiles if folds > 1 else 1


def as_int(v) -> int | None:
    """`v` as a Python int if it is an integer (int, numpy integer; not bool), else None."""
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_gemm(hw: HWConfig, m, n, k, a_bits, b_bits, out_bits, writeback, scope):
    """Refuse a GEMM the device cannot run, naming the argument and what is allowed; returns
    (m, n, k, a_bits, b_bits, out_bits) as Python ints (numpy integers are accepted, bools not)."""
    dims = []
    for name, v in (("m", m), ("n", n), ("k", k)):
        i = as_int(v)
        if i is None or i < 1:
            raise ValueError(f"{name}: got {v!r}; GEMM dimensions must be integers >= 1")
        dims.append(i)
    top = hw.array.operand_bits
    widths = []
    for name, v in (("a_bits", a_bits), ("b_bits", b_bits)):
        i = as_int(v)
        if i is None or not 2 <= i <= top:
            raise ValueError(f"{name}: got {v!r}; {hw.name}'s MACs take operand codes of 2..{top} "
                             f"bits (array.operand_bits)")
        widths.append(i)
    out = as_int(out_bits)
    if out is None or not 2 <= out <= 8:
        raise ValueError(f"out_bits: got {out_bits!r}; output codes are 2..8 bits")
    if not isinstance(writeback, str) or writeback not in WRITEBACKS:
        raise ValueError(f"writeback: got {writeback!r}; expected one of {', '.join(WRITEBACKS)}")
    if not isinstance(scope, str) or scope not in ("tensor", "rows"):
        raise ValueError(f"scope: got {scope!r}; expected 'tensor' or 'rows'")
    return (*dims, *widths, out)
