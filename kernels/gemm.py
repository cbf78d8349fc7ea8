"""`int_gemm`: exact integer GEMM with an emulated fixed-width accumulator and event counts.

Paths, chosen per call (all give identical results; `last_path()` names the one taken):
- exact/<kernel>: if the operands' value range proves that no partial sum can leave the
  accumulator's (and partial sum's) range, the answer is the exact product and nothing
  overflows. The exact product is computed by the kernel that `kernels.paths` chose for this
  machine and size: `intmm` (oneDNN int8 through torch, where a probe proved it exact on this
  CPU), `sgemm` (float32 matmul in K chunks that keep every partial sum within 2^24, chunk
  results added in int64) or `scan` (the scans below as plain multiply-adds, while K * max|a*b|
  fits int32).
- bound/<kernel>: otherwise, if the actual values prove it: every partial sum of output (i, j)
  lies between -sum_k max(0, -a_ik b_kj) and sum_k max(0, a_ik b_kj), computed from the exact
  products a @ b and |a| @ |b|. A cheap bound from row and column sums of |a|, |b| decides first
  whether that is worth trying.
- scan16/32/64: otherwise every MAC is emulated in ascending k by the kernels in `kernels._scan`:
  int16 lanes for accumulators of <= 16 bits (when the products fit int16), int32 lanes up to
  31 bits, int64 lanes beyond. An accumulator that provably cannot overflow (only its partial
  sum can) is emulated at the narrowest width that holds its values.
GEMMs of fewer than `paths.SMALL_MACS` MACs run on the calling thread alone (" serial" in the
path name of the scans): they cannot pay for waking a thread pool.

Numba caching: every kernel here and in `kernels._scan` is compiled with cache=True. Numba checks
a cached kernel against its own source file's timestamp only, and freezes module constants (such
as `_MR`) into the compiled code; a constant that another file also defines must therefore be
edited in both (checked at import, below).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import numba
import numpy as np
from numba import njit, prange

from kernels import _scan, _torch_int8, paths
from kernels._scratch import buffer as _buffer

# Rows per tile of every scan kernel. A literal, not `_scan.MR`: Numba's cache of `_pack_a` is
# invalidated by edits to this file only, so a change must be made here too (checked below).
_MR = 4
if _MR != _scan.MR:
    raise ImportError(f"kernels.gemm packs {_MR} rows per tile, kernels._scan expects {_scan.MR}")

_OVERFLOW_MODES = ("wrap", "saturate")
_F32_EXACT = 1 << 24          # float32 holds every integer of magnitude <= 2^24 exactly
_PLAIN_BLOCK_MIN, _PLAIN_BLOCK_MAX = 8, 256   # MACs per block of the scans' unchecked path
_BOUND_TRY = 4                # try the exact |a| @ |b| bound if the cheap one is within 4x


def int_gemm(a, b, *, acc_bits: int = 32, overflow: str = "wrap", spill_every: int | None = None,
             psum_bits: int = 32) -> tuple[np.ndarray, dict]:
    """Integer GEMM `a @ b` as a MAC array computes it: products added in ascending k into an
    `acc_bits` two's-complement accumulator that wraps or saturates after every add.

    a: (M, K), b: (K, N) int8 or uint8 arrays of 2..8-bit codes (any mix of the two dtypes).
    acc_bits: accumulator width, 8..64. overflow: "wrap" (modulo 2^acc_bits) or "saturate"
    (clamp after every add). spill_every: None, or k >= 1: after every k MACs and after the last
    one the accumulator is added into a `psum_bits`-wide partial sum (8..64, same overflow mode)
    and cleared; the result is then the partial sum.

    Returns (c, counts): c is the int64 (M, N) array of final accumulator (or partial-sum)
    values; counts = {"macs": M*N*K, "overflows": add steps whose exact result left the range
    (MAC adds and spill adds), "spills": M*N*ceil(K/k) with spilling, else 0}.
    Raises ValueError, naming the argument, on bad input.
    """
    a, b, acc_bits, psum_bits, spill_every = _validate(a, b, acc_bits, overflow, spill_every,
                                                       psum_bits)
    _quiet_openblas()
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    (m, k), n = a.shape, b.shape[1]
    nchunks = -(-k // spill_every) if spill_every else 0
    counts = {"macs": m * n * k, "overflows": 0, "spills": m * n * nchunks}
    steps = min(spill_every, k) if spill_every else k     # MACs between accumulator clears

    def exact_suffices(pmin, pmax):
        # Every partial sum of j <= steps products in [pmin, pmax] lies in [steps*min(pmin, 0),
        # steps*max(pmax, 0)]; if that fits, nothing overflows. With spills the spilled values
        # are then exact chunk sums and the partial sums exact prefix sums of all K products.
        return _fits(steps, pmin, pmax, acc_bits) and (
            not spill_every or _fits(k, pmin, pmax, psum_bits))

    # The dtypes alone often prove exactness (int8 x int8 at 32 bits); the codes are scanned
    # for their range only where that is not enough, or where the scans would compute the
    # product (they take narrower lanes for narrower values).
    ranges = _dtype_range(a), _dtype_range(b)
    pmin, pmax = _product_range(*ranges[0], *ranges[1])
    if not exact_suffices(pmin, pmax) or next(iter(paths.exact_order(m * n * k)), "sgemm") == "scan":
        ranges = _code_range(a), _code_range(b)
        pmin, pmax = _product_range(*ranges[0], *ranges[1])
    if exact_suffices(pmin, pmax):
        return _exact_product(a, b, pmin, pmax), counts
    # The accumulator's range is the narrower one (psum_bits >= acc_bits); every accumulator
    # and partial-sum value is a sum of products over a range of k, so the bound covers both.
    c = _exact_if_values_allow(a, b, ranges, pmin, pmax, acc_bits)
    if c is not None:
        return c, counts

    # Partial-sum checks are needed only if nchunks spills of the largest possible
    # accumulator value can leave the partial sum's range.
    spilled = min(1 << (acc_bits - 1), steps * max(pmax, -pmin))
    pcheck = bool(spill_every) and nchunks * spilled > (1 << (psum_bits - 1)) - 1
    # An accumulator that cannot overflow behaves the same at any width that holds its values:
    # emulate it at the narrowest such width (then only the partial sum can overflow).
    bits = acc_bits
    if _fits(steps, pmin, pmax, acc_bits):
        bits = next(w for w in range(8, acc_bits + 1) if _fits(steps, pmin, pmax, w))
    c = np.empty((m, n), np.int64)
    counts["overflows"] = _scan_gemm(a, b, c, bits, overflow == "saturate", spill_every or 0,
                                     psum_bits, pcheck, pmin, pmax)
    return c, counts


_last = threading.local()


def last_path() -> str:
    """The path of this thread's last `int_gemm` call, e.g. 'exact/intmm' or 'scan16 serial'
    (see the module docstring); '' before the first call."""
    return getattr(_last, "path", "")


def _scan_gemm(a, b, c, bits, sat, spill, psum_bits, pcheck, pmin, pmax, exact=False) -> int:
    """Per-MAC emulation into c; returns the overflow count. Picks the narrowest lanes, and one
    thread for small GEMMs. exact: the caller has proven that nothing overflows: all K MACs run
    as one plain block."""
    if bits <= 16 and -32768 <= pmin and pmax <= 32767:
        name, nr, lane = "scan16", _scan.NR16, np.int16
    elif bits <= 31:
        name, nr, lane = "scan32", _scan.NR32, np.int32
    elif bits <= 62:
        name, nr, lane = "scan64", _scan.NR64, np.int64
    else:  # an overflow would need K * 2^16 > 2^62: no such array fits in memory
        raise ValueError(f"acc_bits={bits}: cannot emulate K={a.shape[1]} with products in "
                         f"[{pmin}, {pmax}]")
    # Plain blocks: blk MACs that start with every accumulator inside [ls, hs] cannot overflow.
    hi = (1 << (bits - 1)) - 1
    pos, neg = max(pmax, 0), min(pmin, 0)
    blk = min(_PLAIN_BLOCK_MAX, (hi // 2) // max(pos, -neg, 1))
    if blk < _PLAIN_BLOCK_MIN or lane is np.int64:
        blk = 0
    ls, hs = -hi - 1 - blk * neg, hi - blk * pos
    if exact:
        blk, ls, hs = a.shape[1], -hi - 1, hi

    (m, k), n = a.shape, b.shape[1]
    serial = m * n * k < paths.SMALL_MACS
    _last.path = ("exact/" if exact else "") + name + (" serial" if serial else "")
    nti, ntj = -(-m // _MR), -(-n // nr)
    ap = _buffer("ap", (nti, k, _MR), np.int16)
    bp = _buffer("bp", (ntj, k, nr), np.int16)
    tiles = nti * ntj
    s = _buffer("s", (tiles, _MR * nr), lane)
    cnt = _buffer("cnt", (tiles if lane is not np.int64 else 1, _MR * nr), lane)
    ps = _buffer("ps", (tiles if spill else 1, _MR * nr), np.int64)
    with _numba_threads(1 if serial else None):
        _pack_a(a.view(np.int8), a.dtype == np.uint8, ap)
        _pack_b(b.view(np.int8), b.dtype == np.uint8, bp)
        return int(getattr(_scan, name)(ap, bp, c, s, cnt, ps, bits, sat, spill, psum_bits,
                                        pcheck, blk, ls, hs))


@contextlib.contextmanager
def _numba_threads(n: int | None):
    """Numba's thread count for this thread set to n (None: unchanged) for the block. A
    parallel region of one thread wakes no pool threads."""
    if n is None:
        yield
        return
    saved = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


def _product_range(amin: int, amax: int, bmin: int, bmax: int) -> tuple[int, int]:
    """Smallest and largest product of a in [amin, amax] and b in [bmin, bmax]."""
    corners = (amin * bmin, amin * bmax, amax * bmin, amax * bmax)
    return min(corners), max(corners)


def _fits(steps: int, pmin: int, pmax: int, bits: int) -> bool:
    """True if no sum of at most `steps` products in [pmin, pmax] can leave `bits` bits."""
    half = 1 << (bits - 1)
    return steps * max(pmax, 0) <= half - 1 and steps * min(pmin, 0) >= -half


def _exact_product(a: np.ndarray, b: np.ndarray, pmin: int, pmax: int,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Exact int64 a @ b for products in [pmin, pmax], by the first kernel in this machine's
    order (`kernels.paths`) that applies: the scans only while every partial sum fits int32.
    Into `out` (M, N) int64 if given, else a new array."""
    (m, k), n = a.shape, b.shape[1]
    kernel = next((name for name in paths.exact_order(m * n * k)
                   if name != "scan" or _fits(k, pmin, pmax, 31)), "sgemm")
    return _exact_by(kernel, a, b, pmin, pmax, out)


def exact_product_by(kernel: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 a @ b of int8/uint8 codes by the named kernel ("intmm", "sgemm", "scan"),
    for timing and testing each one. Raises ValueError where it does not apply."""
    a = np.ascontiguousarray(_check_operand("a", a))
    b = np.ascontiguousarray(_check_operand("b", b))
    _quiet_openblas()
    pmin, pmax = _product_range(*_code_range(a), *_code_range(b))
    if kernel == "scan" and not _fits(a.shape[1], pmin, pmax, 31):
        raise ValueError(f"scan: K={a.shape[1]} products in [{pmin}, {pmax}] overflow int32")
    if kernel == "intmm" and not _torch_int8.exact_on_this_cpu():
        raise ValueError("intmm: torch._int_mm is not available or not exact on this CPU")
    if kernel not in paths.KERNELS:
        raise ValueError(f"kernel: got {kernel!r}; allowed: {', '.join(paths.KERNELS)}")
    return _exact_by(kernel, a, b, pmin, pmax)


def _exact_by(kernel: str, a: np.ndarray, b: np.ndarray, pmin: int, pmax: int,
              out: np.ndarray | None = None) -> np.ndarray:
    if kernel == "intmm":
        _last.path = "exact/intmm"
        serial = a.shape[0] * a.shape[1] * b.shape[1] < paths.SMALL_MACS
        return _torch_int8.product(a, b, serial, out)
    if kernel == "sgemm":
        _last.path = "exact/sgemm"
        return _sgemm_product(a, b, max(pmax, -pmin), out)
    c = np.empty((a.shape[0], b.shape[1]), np.int64) if out is None else out
    bits = 16 if _fits(a.shape[1], pmin, pmax, 16) else 31
    _scan_gemm(a, b, c, bits, False, 0, 64, False, pmin, pmax, exact=True)
    return c


def _exact_if_values_allow(a, b, ranges, pmin, pmax, acc_bits) -> np.ndarray | None:
    """The exact a @ b if the actual values prove that no partial sum of any output leaves the
    `acc_bits` range (then nothing can overflow); else None. ranges: (min, max) of a and of b.

    Every partial sum of output (i, j) lies in [-neg_ij, pos_ij], pos = sum_k max(0, a_ik b_kj)
    = (|a| @ |b| + a @ b) / 2, neg = (|a| @ |b| - a @ b) / 2. That costs two exact products, so
    it is tried only if a cheap bound on |a| @ |b| (from row sums of |a| and column sums of |b|)
    is within `_BOUND_TRY` times the range; if the cheap bound itself fits, one product suffices.
    """
    hi = (1 << (acc_bits - 1)) - 1
    amax, bmax = (max(-lo, top) for lo, top in ranges)
    row_max, col_max = _magnitude_sums(a.view(np.int8), a.dtype == np.uint8,
                                       b.view(np.int8), b.dtype == np.uint8)
    cheap = min(row_max * bmax, amax * col_max)      # >= every entry of |a| @ |b|
    if cheap > _BOUND_TRY * hi:
        return None
    c = _exact_product(a, b, pmin, pmax)
    path = _last.path.replace("exact/", "bound/")
    if cheap > hi:
        t = _exact_product(_magnitudes(a, "a_abs"), _magnitudes(b, "b_abs"), 0, amax * bmax,
                           out=_buffer("t", c.shape, np.int64))
        if not _sums_within(t, c, hi):
            return None
    _last.path = path
    return c


def _magnitudes(x: np.ndarray, key: str) -> np.ndarray:
    """|x| as uint8 (|-128| = 128 fits) in scratch buffer `key`; uint8 codes are their own
    magnitudes."""
    if x.dtype == np.uint8:
        return x
    out = _buffer(key, x.shape, np.int8)
    np.abs(x, out=out)
    return out.view(np.uint8)


@njit(cache=True)
def _sums_within(t, c, hi):
    """Whether (t + c) / 2 <= hi and (t - c) / 2 <= hi + 1 everywhere: t = |a| @ |b|, c = a @ b;
    the halves are the sums of the positive and of the negative products."""
    t, c = t.ravel(), c.ravel()
    bad = 0
    for i in range(t.size):
        bad += (t[i] + c[i] > 2 * hi) | (t[i] - c[i] > 2 * (hi + 1))
    return bad == 0


def _dtype_range(x: np.ndarray) -> tuple[int, int]:
    return (0, 255) if x.dtype == np.uint8 else (-128, 127)


def _code_range(x: np.ndarray) -> tuple[int, int]:
    """(min, max) of int8 or uint8 codes."""
    lo, hi = _min_max(x.view(np.int8), x.dtype == np.uint8)
    return int(lo), int(hi)


@njit(cache=True)
def _min_max(x, unsigned):
    """(min, max) of x: int8 codes, read as uint8 when `unsigned`."""
    lo, hi = np.int16(255), np.int16(-128)
    for v in x.ravel():
        w = np.int16(np.int16(v) & 0xFF) if unsigned else np.int16(v)
        lo, hi = min(lo, w), max(hi, w)
    return lo, hi


@njit(cache=True)
def _magnitude_sums(a, a_unsigned, b, b_unsigned):
    """(largest row sum of |a|, largest column sum of |b|); operands as in `_min_max`."""
    m, k = a.shape
    n = b.shape[1]
    row_max = np.int64(0)
    for i in range(m):
        s = np.int64(0)
        for kk in range(k):
            v = np.int16(a[i, kk])
            s += np.int16(v & 0xFF) if a_unsigned else abs(v)
        row_max = max(row_max, s)
    cols = np.zeros(n, np.int64)
    for kk in range(k):
        for j in range(n):
            v = np.int16(b[kk, j])
            cols[j] += np.int16(v & 0xFF) if b_unsigned else abs(v)
    return row_max, cols.max()


def _sgemm_product(a: np.ndarray, b: np.ndarray, pabs: int,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Exact int64 a @ b via float32 sgemm over K chunks whose partial sums stay <= 2^24;
    into `out` if given."""
    (m, k), n = a.shape, b.shape[1]
    kc = k if pabs == 0 else max(1, min(k, _F32_EXACT // pabs))
    af = _buffer("af", (m, k), np.float32)
    bf = _buffer("bf", (k, n), np.float32)
    cf = _buffer("cf", (m, n), np.float32)
    _to_f32(a.view(np.int8), a.dtype == np.uint8, af)
    _to_f32(b.view(np.int8), b.dtype == np.uint8, bf)
    for k0 in range(0, k, kc):
        np.matmul(af[:, k0:k0 + kc], bf[k0:k0 + kc], out=cf)
        if k0 == 0:
            # Allocated after the first sgemm, which mallocs and frees a work area of its own:
            # allocated before, c would sit below it and glibc would trim both on free, so that
            # every call faults in fresh pages again.
            c = np.empty((m, n), np.int64) if out is None else out
        _to_i64(cf, k0 > 0, c)
    return c


@njit(cache=True, parallel=True)
def _pack_a(a, unsigned, ap):
    """Pack (M, K) int8 codes (uint8 viewed as int8 when `unsigned`) into the scans' A panels:
    ap[ti, k, r] = a[ti*MR + r, k], zero where ti*MR + r >= M; ap: (ceil(M/MR), K, MR) int16."""
    m, k = a.shape
    nti = ap.shape[0]
    for ti in prange(nti):
        i0 = ti * _MR
        if i0 + _MR <= m and unsigned:
            for kk in range(k):
                for r in range(_MR):
                    ap[ti, kk, r] = np.int16(a[i0 + r, kk]) & 0xFF
        elif i0 + _MR <= m:
            for kk in range(k):
                for r in range(_MR):
                    ap[ti, kk, r] = a[i0 + r, kk]
        else:
            for kk in range(k):
                for r in range(_MR):
                    v = np.int16(0)
                    if i0 + r < m:
                        v = np.int16(a[i0 + r, kk])
                        if unsigned:
                            v = np.int16(v & 0xFF)
                    ap[ti, kk, r] = v


@njit(cache=True, parallel=True)
def _pack_b(b, unsigned, bp):
    """Pack (K, N) int8 codes (uint8 viewed as int8 when `unsigned`) into the scans' B panels:
    bp[tj, k, j] = b[k, tj*nr + j], zero where tj*nr + j >= N; bp: (ceil(N/nr), K, nr) int16."""
    k, n = b.shape
    ntj, _, nr = bp.shape
    full = n // nr
    for kk in prange(k):
        for tj in range(full):
            j0 = tj * nr
            if unsigned:
                for j in range(nr):
                    bp[tj, kk, j] = np.int16(b[kk, j0 + j]) & 0xFF
            else:
                for j in range(nr):
                    bp[tj, kk, j] = b[kk, j0 + j]
        if full < ntj:
            j0 = full * nr
            for j in range(nr):
                v = np.int16(0)
                if j0 + j < n:
                    v = np.int16(b[kk, j0 + j])
                    if unsigned:
                        v = np.int16(v & 0xFF)
                bp[full, kk, j] = v


# The conversions around sgemm are serial on purpose: Numba's OpenMP threads keep spinning
# after a parallel region and would share cores with OpenBLAS's threads (measured: sgemm 1.5x
# slower right after a parallel conversion). Serial they cost 1-9% of the sgemm.


@njit(cache=True)
def _to_f32(x, unsigned, out):
    """out = x as float32; x: int8 codes, read as uint8 when `unsigned`."""
    m, n = x.shape
    if unsigned:
        for i in range(m):
            for j in range(n):
                out[i, j] = np.float32(np.int16(x[i, j]) & 0xFF)
    else:
        for i in range(m):
            for j in range(n):
                out[i, j] = np.float32(x[i, j])


@njit(cache=True)
def _to_i64(x, add, out):
    """out (+)= x as int64; x: float32 holding integers of magnitude <= 2^24 (exact)."""
    m, n = x.shape
    if add:
        for i in range(m):
            for j in range(n):
                out[i, j] += np.int64(x[i, j])
    else:
        for i in range(m):
            for j in range(n):
                out[i, j] = np.int64(x[i, j])


def _validate(a, b, acc_bits, overflow, spill_every, psum_bits):
    """Check the arguments of `int_gemm`; return (a, b, acc_bits, psum_bits, spill_every)."""
    a = _check_operand("a", a)
    b = _check_operand("b", b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a, b: inner dimensions differ: a is {a.shape[0]}x{a.shape[1]}, b is "
                         f"{b.shape[0]}x{b.shape[1]}; a.shape[1] must equal b.shape[0]")
    acc_bits = _check_bits("acc_bits", acc_bits)
    psum_bits = _check_bits("psum_bits", psum_bits)
    if not isinstance(overflow, str) or overflow not in _OVERFLOW_MODES:
        raise ValueError(f"overflow: got {overflow!r}; allowed: 'wrap' or 'saturate'")
    if spill_every is not None:
        if isinstance(spill_every, (bool, np.bool_)) or not isinstance(spill_every,
                                                                       (int, np.integer)):
            raise ValueError(f"spill_every: got {spill_every!r} ({type(spill_every).__name__}); "
                             "allowed: None or an int >= 1")
        spill_every = int(spill_every)
        if spill_every < 1:
            raise ValueError(f"spill_every: got {spill_every}; allowed: None or an int >= 1")
        if psum_bits < acc_bits:
            raise ValueError(f"psum_bits: got {psum_bits}, narrower than acc_bits = {acc_bits}; "
                             f"spills add the accumulator into the partial sum, so psum_bits "
                             f"must be >= acc_bits")
    return a, b, acc_bits, psum_bits, spill_every


def _check_operand(name: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array of int8 or uint8 codes, got "
                         f"{type(x).__name__}")
    if x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"{name}: dtype {x.dtype} is not allowed; expected int8 or uint8 codes "
                         "(e.g. x.astype(np.int8))")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got {x.ndim}-D with shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name}: shape {x.shape} has an empty dimension; every dimension must "
                         "be >= 1")
    return x


def _check_bits(name: str, v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 8 <= v <= 64:
        raise ValueError(f"{name}: got {v!r}; allowed: an int from 8 to 64")
    return int(v)


_openblas_lock = threading.Lock()
_openblas_done = False


def _quiet_openblas() -> None:
    """Make numpy's OpenBLAS idle threads sleep right after a call instead of spinning ~90 ms.

    By default (OPENBLAS_THREAD_TIMEOUT unset: 2^28 cycles) they spin on every core after each
    sgemm and starve the parallel scan kernels: measured 3-20x slower scans right after a numpy
    matmul on 2 cores. Unless the user chose a timeout, set the minimum (4) and restart the
    thread pool so it takes effect. Does nothing where numpy does not use OpenBLAS.
    """
    global _openblas_done
    with _openblas_lock:
        if _openblas_done:
            return
        _openblas_done = True
        _set_openblas_timeout()


def _set_openblas_timeout() -> None:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            timeout, read_env, shutdown = (lib.openblas_thread_timeout, lib.openblas_read_env,
                                           lib.blas_thread_shutdown_)
        except (OSError, AttributeError):
            continue
        if timeout() > 0:          # the user's own choice, read when OpenBLAS started
            continue
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
        read_env()
        shutdown()                 # the next BLAS call restarts the pool with the new timeout
