"""Per-MAC accumulator emulation: register-blocked, vectorized, prange-parallel Numba kernels.

Each kernel walks k in ascending order and applies the accumulator's overflow rule after every
MAC, counting the steps whose exact result left the accumulator's range. Operands arrive packed
(by `kernels.gemm`) into zero-padded int16 panels, so that one tile of MR rows x NR columns
reads contiguous memory: `Ap[ti, k, r]` and `Bp[tj, k, j]`. Zero padding is harmless: padded
lanes add products of 0, never overflow and are not written out.

Per-tile state lives in 2-D scratch arrays indexed `[t, r * NR + j]`: the offsets between a
tile's rows are compile-time constants, so LLVM can prove that they do not overlap and keeps the
tile's accumulators and counters in vector registers across the k loop (with a 3-D array the row
stride is a run-time value and every MAC loads and stores them). This also needs the arrays to be
noalias, which Numba grants a prange body only if it creates no views: no slicing inside. The
caller passes the scratch arrays and the packed operands, so that repeated calls reuse memory
instead of faulting in fresh pages.

Lane widths:
- `scan16`: int16 lanes, accumulators of at most 16 bits, products that fit int16;
- `scan32`: int32 lanes, accumulators of at most 31 bits (acc + product never leaves int32);
- `scan64`: int64 lanes, any accumulator whose per-MAC sum stays inside int64 (<= 62 bits).

Overflow detection (int16 lanes), with s the saturating int16 sum, w the wrapping int16 sum,
[lo, hi] the accumulator's range and e = acc + p the exact sum:
- saturate: new acc c = clamp(s, lo, hi); the step overflowed iff c != w;
- wrap: new acc c = w reduced to `bits` bits; the step overflowed iff c != s.
(Both hold for every e, including e outside int16: then s is an int16 limit, w = e -+ 2^16.)
Wider lanes hold e exactly: the step overflowed iff the new accumulator differs from e.

Tuning, measured on one core of an AVX-512/AMX Xeon at 512^3 (GMAC/s, saturating int16 / int32
lanes that overflow): 512-bit vectors (`kernels.cpu.prefer_512_bit_vectors`) 39 / 13; LLVM's
default preference for 256-bit vectors 24 / 7; code compiled for AVX2 (Haswell) 21 (int16).
No other tile was faster than 4x64 int16 lanes: 4x32, 2x128, 8x32 at 256 bits; 2x128, 4x128,
6x64, 8x32 at 512 bits (8x64 spills registers: 33). The int16 scan is then near its limit of
about 5 vector operations per 32 MACs (multiply, saturating add, wrapping add, compare, count):
~0.45 of a 512-bit float32 sgemm per core.

For GEMMs too small to pay for waking a thread pool, the caller runs these kernels with Numba's
thread count set to 1 (a serial Numba function would not do: its arrays are not noalias, and the
tile's accumulators would then be loaded and stored on every MAC, 2.2x slower).

Spilling (`spill` > 0): every `spill` MACs and after the last one, the accumulator is added into
an int64 partial sum `PS` with the partial sum's own range [plo, phi] and mode, then cleared.
"""
import numpy as np
from numba import njit, prange

MR = 4                   # rows per tile, in every kernel (the packing relies on it)
MR16, NR16 = MR, 64      # int16 tile: 8 zmm (16 ymm) accumulators + as many counters
MR32, NR32 = MR, 32      # int32 tile: 8 zmm (16 ymm) accumulators + as many counters
MR64, NR64 = MR, 16      # int64 tile
FLUSH16 = 32767      # int16 lane counters are flushed after at most this many MACs
FLUSH_WIDE = 1 << 30


@njit(inline="always", cache=True)
def _sadd16(x, p):
    """Saturating int16 add (LLVM: sadd.sat, vpaddsw)."""
    return np.int16(min(max(np.int32(x) + np.int32(p), np.int32(-32768)), np.int32(32767)))


@njit(inline="always", cache=True)
def _mac16(x, p, lo, hi, mask, sat, narrow):
    """One int16-lane MAC step: (new accumulator, 1 if the step overflowed else 0).
    Wrapping to bits < 16: ((w - lo) & mask) + lo with mask = 2^bits - 1, all in int16 (a
    shift by a run-time count would be widened to int64 lanes)."""
    s = _sadd16(x, p)
    w = np.int16(x + p)
    if sat:
        c = min(max(s, lo), hi) if narrow else s
        return c, np.int16(c != w)
    c = np.int16(np.int16(np.int16(w - lo) & mask) + lo) if narrow else w
    return c, np.int16(c != s)


@njit(inline="always", cache=True)
def _mac32(x, p, lo, hi, mask, sat):
    """One int32-lane MAC step; e = x + p is exact in int32 because bits <= 31."""
    e = np.int32(x + p)
    if sat:
        c = min(max(e, lo), hi)
    else:
        c = np.int32(np.int32(np.int32(e - lo) & mask) + lo)
    return c, np.int32(c != e)


@njit(inline="always", cache=True)
def _mac64(x, p, lo, hi, sh, sat):
    """One int64-lane MAC step; e = x + p is exact in int64 because bits <= 62."""
    e = x + p
    if sat:
        c = min(max(e, lo), hi)
    else:
        c = (e << sh) >> sh
    return c, c != e


@njit(inline="always", cache=True)
def _spill(S, PS, t, nl, plo, phi, psh, psat, pcheck):
    """Add the accumulators of tile t into its partial sums, clear them; return overflows."""
    ov = 0
    for l in range(nl):
        e = PS[t, l] + np.int64(S[t, l])
        if pcheck:
            if psat:
                c = min(max(e, plo), phi)
            else:
                c = (e << psh) >> psh
            ov += c != e
            PS[t, l] = c
        else:
            PS[t, l] = e
        S[t, l] = 0
    return ov


@njit(inline="always", cache=True)
def _inside(S, t, nl, ls, hs):
    """True if every accumulator of tile t lies in [ls, hs]."""
    bad = 0
    for l in range(nl):
        x = S[t, l]
        bad += (x < ls) | (x > hs)
    return bad == 0


@njit(inline="always", cache=True)
def _init(S, CNT, PS, t, nl, spill):
    for l in range(nl):
        S[t, l] = 0
        CNT[t, l] = 0
        if spill > 0:
            PS[t, l] = 0


@njit(inline="always", cache=True)
def _flush(CNT, t, nl):
    """Sum and clear the per-lane overflow counters of tile t."""
    total = 0
    for l in range(nl):
        total += CNT[t, l]
        CNT[t, l] = 0
    return total


@njit(inline="always", cache=True)
def _write(out, src, t, i0, j0, mr, nr):
    """Copy tile t of the scratch `src` into the valid part of `out` (int64)."""
    m, n = out.shape
    # Unsigned indices: no negative-index wraparound, so contiguous stores instead of scatters
    # (a row slice would do too, but any view in a prange body costs every array its noalias).
    for r in range(min(mr, m - i0)):
        i = np.uint64(i0 + r)
        for j in range(min(nr, n - j0)):
            out[i, np.uint64(j0 + j)] = src[t, r * nr + j]


# The tile loops below share one structure. K is cut into spill chunks (or one chunk), each chunk
# into blocks of `blk` MACs. A block that starts with every accumulator of the tile inside
# [ls, hs] cannot overflow (the caller derives ls, hs from the products' range), so it runs as
# plain multiply-adds; any other block runs the checked per-MAC loop. blk = 0 disables the plain
# path (blocks are then as long as the lane counters allow).
# The plain loops run r inside j: with the short body of r-outer loops LLVM unrolls j fully
# before vectorizing, then either vectorizes over k with gathers (add-reductions) or not at all.


@njit(inline="always", cache=True)
def _tile16(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh, pcheck, blk,
            ls, hs, sat, narrow):
    tj = t // nti
    ti = t - tj * nti
    L = MR16 * NR16
    _init(S, CNT, PS, t, L, spill)
    total = 0
    chunk = spill if spill > 0 else K
    step = blk if blk > 0 else FLUSH16
    k0 = 0
    while k0 < K:
        k1 = min(k0 + chunk, K)
        kb = k0
        while kb < k1:
            ke = min(kb + step, k1)
            if blk > 0 and _inside(S, t, L, ls, hs):
                for k in range(kb, ke):
                    for j in range(NR16):
                        bv = Bp[tj, k, j]
                        for r in range(MR16):
                            S[t, r * NR16 + j] = np.int16(S[t, r * NR16 + j]
                                                          + np.int16(Ap[ti, k, r] * bv))
            else:
                for k in range(kb, ke):
                    for r in range(MR16):
                        av = Ap[ti, k, r]
                        for j in range(NR16):
                            p = np.int16(av * Bp[tj, k, j])
                            c, o = _mac16(S[t, r * NR16 + j], p, lo, hi, mask, sat, narrow)
                            S[t, r * NR16 + j] = c
                            CNT[t, r * NR16 + j] = np.int16(CNT[t, r * NR16 + j] + o)
                total += _flush(CNT, t, L)
            kb = ke
        if spill > 0:
            total += _spill(S, PS, t, L, plo, phi, psh, sat, pcheck)
        k0 = k1
    if spill > 0:
        _write(out, PS, t, ti * MR16, tj * NR16, MR16, NR16)
    else:
        _write(out, S, t, ti * MR16, tj * NR16, MR16, NR16)
    return total


@njit(cache=True, parallel=True)
def scan16(Ap, Bp, out, S, CNT, PS, bits, sat, spill, pbits, pcheck, blk, ls, hs):
    """int16 lanes (bits <= 16, products within int16). Fills `out`; returns the overflow count.

    S, CNT: (tiles, MR16*NR16) int16 scratch; PS: (tiles, MR16*NR16) int64 when spilling, else
    (1, MR16*NR16); tiles = Ap.shape[0] * Bp.shape[0]. spill: MACs per spill, 0 for none;
    pbits: partial-sum width; pcheck: whether partial-sum adds can overflow; blk, ls, hs: the
    plain-block parameters (see above).
    """
    nti, K, _ = Ap.shape
    nt = nti * Bp.shape[0]
    tot = np.zeros(nt, np.int64)
    lo = np.int16(-(1 << (bits - 1)))
    hi = np.int16((1 << (bits - 1)) - 1)
    mask = np.int16((1 << bits) - 1)        # the wrap mask (unused at 16 bits)
    plo = -(1 << (pbits - 1))
    phi = (1 << (pbits - 1)) - 1
    psh = 64 - pbits
    ls16 = np.int16(ls)
    hs16 = np.int16(hs)
    # One loop per (mode, narrow) so that each inner loop is specialized at compile time.
    if sat and bits < 16:
        for t in prange(nt):
            tot[t] = _tile16(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls16, hs16, True, True)
    elif sat:
        for t in prange(nt):
            tot[t] = _tile16(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls16, hs16, True, False)
    elif bits < 16:
        for t in prange(nt):
            tot[t] = _tile16(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls16, hs16, False, True)
    else:
        for t in prange(nt):
            tot[t] = _tile16(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls16, hs16, False, False)
    return tot.sum()


@njit(inline="always", cache=True)
def _tile32(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh, pcheck, blk,
            ls, hs, sat):
    tj = t // nti
    ti = t - tj * nti
    L = MR32 * NR32
    _init(S, CNT, PS, t, L, spill)
    total = 0
    chunk = spill if spill > 0 else K
    step = blk if blk > 0 else FLUSH_WIDE
    k0 = 0
    while k0 < K:
        k1 = min(k0 + chunk, K)
        kb = k0
        while kb < k1:
            ke = min(kb + step, k1)
            if blk > 0 and _inside(S, t, L, ls, hs):
                for k in range(kb, ke):
                    for j in range(NR32):
                        bv = np.int32(Bp[tj, k, j])
                        for r in range(MR32):
                            S[t, r * NR32 + j] = np.int32(S[t, r * NR32 + j]
                                                          + np.int32(np.int32(Ap[ti, k, r]) * bv))
            else:
                for k in range(kb, ke):
                    for r in range(MR32):
                        av = np.int32(Ap[ti, k, r])
                        for j in range(NR32):
                            p = np.int32(av * np.int32(Bp[tj, k, j]))
                            c, o = _mac32(S[t, r * NR32 + j], p, lo, hi, mask, sat)
                            S[t, r * NR32 + j] = c
                            CNT[t, r * NR32 + j] = np.int32(CNT[t, r * NR32 + j] + o)
                total += _flush(CNT, t, L)
            kb = ke
        if spill > 0:
            total += _spill(S, PS, t, L, plo, phi, psh, sat, pcheck)
        k0 = k1
    if spill > 0:
        _write(out, PS, t, ti * MR32, tj * NR32, MR32, NR32)
    else:
        _write(out, S, t, ti * MR32, tj * NR32, MR32, NR32)
    return total


@njit(cache=True, parallel=True)
def scan32(Ap, Bp, out, S, CNT, PS, bits, sat, spill, pbits, pcheck, blk, ls, hs):
    """int32 lanes (bits <= 31). As `scan16`, with int32 scratch S, CNT of width MR32*NR32."""
    nti, K, _ = Ap.shape
    nt = nti * Bp.shape[0]
    tot = np.zeros(nt, np.int64)
    lo = np.int32(-(1 << (bits - 1)))
    hi = np.int32((1 << (bits - 1)) - 1)
    mask = np.int32((1 << bits) - 1)        # the wrap mask
    plo = -(1 << (pbits - 1))
    phi = (1 << (pbits - 1)) - 1
    psh = 64 - pbits
    ls32 = np.int32(ls)
    hs32 = np.int32(hs)
    if sat:
        for t in prange(nt):
            tot[t] = _tile32(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls32, hs32, True)
    else:
        for t in prange(nt):
            tot[t] = _tile32(Ap, Bp, S, CNT, PS, out, t, nti, K, lo, hi, mask, spill, plo, phi, psh,
                             pcheck, blk, ls32, hs32, False)
    return tot.sum()


@njit(inline="always", cache=True)
def _tile64(Ap, Bp, S, PS, out, t, nti, K, lo, hi, sh, spill, plo, phi, psh, pcheck, sat):
    tj = t // nti
    ti = t - tj * nti
    L = MR64 * NR64
    for l in range(L):
        S[t, l] = 0
        if spill > 0:
            PS[t, l] = 0
    total = 0
    chunk = spill if spill > 0 else K
    k0 = 0
    while k0 < K:
        k1 = min(k0 + chunk, K)
        for k in range(k0, k1):
            for r in range(MR64):
                av = np.int64(Ap[ti, k, r])
                for j in range(NR64):
                    c, o = _mac64(S[t, r * NR64 + j], av * np.int64(Bp[tj, k, j]), lo, hi, sh,
                                  sat)
                    S[t, r * NR64 + j] = c
                    total += o
        if spill > 0:
            total += _spill(S, PS, t, L, plo, phi, psh, sat, pcheck)
        k0 = k1
    if spill > 0:
        _write(out, PS, t, ti * MR64, tj * NR64, MR64, NR64)
    else:
        _write(out, S, t, ti * MR64, tj * NR64, MR64, NR64)
    return total


@njit(cache=True, parallel=True)
def scan64(Ap, Bp, out, S, CNT, PS, bits, sat, spill, pbits, pcheck, blk, ls, hs):
    """int64 lanes (bits <= 62): simple and rarely needed (an accumulator of 32+ bits overflows
    only for huge K). As `scan16`, with int64 scratch S of width MR64*NR64; CNT, blk, ls and hs
    are unused."""
    nti, K, _ = Ap.shape
    nt = nti * Bp.shape[0]
    tot = np.zeros(nt, np.int64)
    lo = -(1 << (bits - 1))
    hi = (1 << (bits - 1)) - 1
    sh = 64 - bits
    plo = -(1 << (pbits - 1))
    phi = (1 << (pbits - 1)) - 1
    psh = 64 - pbits
    if sat:
        for t in prange(nt):
            tot[t] = _tile64(Ap, Bp, S, PS, out, t, nti, K, lo, hi, sh, spill, plo, phi, psh,
                             pcheck, True)
    else:
        for t in prange(nt):
            tot[t] = _tile64(Ap, Bp, S, PS, out, t, nti, K, lo, hi, sh, spill, plo, phi, psh,
                             pcheck, False)
    return tot.sum()

