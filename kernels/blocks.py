"""`block_gemm`: exact integer GEMM of block-scaled operands (shared power-of-two exponents).

Each operand's elements come in blocks along K of `block` consecutive values that share one
exponent (A: per row and block of its columns, B: per block of its rows and column), as in
OCP Microscaling formats. A MAC array computes output (i, j) as block partial sums, each of
`block` products added in ascending k into a fresh accumulator, then shifted left by the two
blocks' exponents above the row's and the column's smallest (the reference exponents, known
before the GEMM from the scale bytes) and added into the running sum:

    c_ij = sum_b  P_ijb << ((ea_ib - ra_i) + (eb_bj - rb_j)),   value = c_ij * 2^(ra_i + rb_j)

Both the block sum and the running sum are `acc_bits` wide and wrap or saturate after every add;
an aligned block sum that leaves the running sum's range counts one overflow. Exact for any
exponents (shifts past the accumulator's width are handled without forming the product). Rows
whose sums provably stay in range (bounded by block length x max|a| x max|b| x 2^shift) take
exact block products from float matmuls, shifted and added in int64; the others are emulated
add by add in Numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.gemm import _code_range

MAX_ACC_BITS = 62   # the aligned-add test forms (running sum >> shift) + block sum in int64


def block_gemm(a, a_exp, b, b_exp=None, *, block: int, acc_bits: int = 32,
               overflow: str = "wrap") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Integer GEMM of block-scaled codes: a (M x K) with exponents a_exp (M x ceil(K/block)),
    b (K x N) with b_exp (ceil(K/block) x N, or None: all 0). Returns (c int64 M x N, the row
    reference exponents ra (M,), the column ones rb (N,), {"macs", "overflows"}); the products
    are c * 2^(ra_i + rb_j). The last block may be short."""
    if overflow not in ("wrap", "saturate"):
        raise ValueError(f"overflow: got {overflow!r}; expected 'wrap' or 'saturate'")
    if isinstance(acc_bits, bool) or not isinstance(acc_bits, (int, np.integer)) or \
            not 8 <= acc_bits <= MAX_ACC_BITS:
        raise ValueError(f"acc_bits: got {acc_bits!r}; block-scaled GEMMs emulate accumulators "
                         f"of 8..{MAX_ACC_BITS} bits")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block: got {block!r}; expected an integer >= 1")
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype not in (np.int8, np.uint8):
            raise ValueError(f"{name}: expected a 2-D int8 or uint8 array of codes")
    (m, k), (kb, n) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"a, b: inner dimensions differ ({m}x{k} @ {kb}x{n})")
    blocks = -(-k // block)
    b_exp = np.zeros((blocks, n), np.int64) if b_exp is None else b_exp
    for name, e, shape in (("a_exp", a_exp, (m, blocks)), ("b_exp", b_exp, (blocks, n))):
        if np.shape(e) != shape:
            raise ValueError(f"{name}: shape {np.shape(e)}; expected {shape}, one exponent per "
                             f"block of {block} along K = {k}")
    a_exp = np.asarray(a_exp, np.int64)
    b_exp = np.asarray(b_exp, np.int64)
    ra = a_exp.min(axis=1) if blocks else np.zeros(m, np.int64)
    rb = b_exp.min(axis=0) if blocks else np.zeros(n, np.int64)
    # a block's sum cannot leave the accumulator when block * max|a| * max|b| fits it
    peak = _magnitude(a) * _magnitude(b)
    checked = min(block, k) * peak > (1 << (acc_bits - 1)) - 1
    sa, sb = a_exp - ra[:, None], b_exp - rb[None, :]
    c = np.empty((m, n), np.int64)
    overflows = np.zeros(m, np.int64)
    # rows whose aligned sums provably stay in range: exact block products, shifted and added
    lengths = np.minimum(block, k - block * np.arange(blocks))
    bound = (lengths * peak * np.exp2(sa + sb.max(axis=1, initial=0))).sum(axis=1)
    safe = (bound < 2.0 ** (acc_bits - 1)) & (not checked)
    if safe.any():
        c[safe] = _aligned_product(a[safe], b, sa[safe], sb, block, bound[safe].max())
    if not safe.all():   # the rest add by add
        rest = ~safe
        part, counts = np.empty((rest.sum(), n), np.int64), np.zeros(rest.sum(), np.int64)
        _block_gemm(a[rest].astype(np.int16), np.ascontiguousarray(b.T).astype(np.int16),
                    sa[rest], sb, block, acc_bits, overflow == "saturate", checked, part, counts)
        c[rest], overflows[rest] = part, counts
    return c, ra, rb, {"macs": m * n * k, "overflows": int(overflows.sum())}


def _aligned_product(a, b, sa, sb, block, bound) -> np.ndarray:
    """sum_b (A_b @ B_b) << (sa_ib + sb_bj) for rows whose every partial sum is at most
    `bound` in magnitude. With B's exponents all equal, one float matmul of A's codes times
    2^sa (exact: float32 below 2^24, float64 below 2^53); otherwise block by block, each
    block's product exact in float, shifted and added in int64."""
    if not sb.any() and bound < 2.0 ** 53:
        exact = np.float32 if bound < 2.0 ** 24 else np.float64
        shifts = np.repeat(np.exp2(sa).astype(exact), block, axis=1)[:, :a.shape[1]]
        return ((a * shifts) @ b.astype(exact)).astype(np.int64)
    peak = _magnitude(a) * _magnitude(b)
    exact = np.float32 if min(block, a.shape[1]) * peak <= 1 << 24 else np.float64
    af, bf = a.astype(exact), b.astype(exact)
    out = np.zeros((a.shape[0], b.shape[1]), np.int64)
    for blk in range(sa.shape[1]):
        cols = slice(blk * block, (blk + 1) * block)
        part = (af[:, cols] @ bf[cols]).astype(np.int64)
        out += np.left_shift(part, sa[:, blk, None] + sb[None, blk, :])
    return out


def _magnitude(x: np.ndarray) -> int:
    """The largest |code| of an int8 or uint8 array (0 if empty)."""
    if not x.size:
        return 0
    lo, hi = _code_range(x)
    return max(hi, -lo)


@njit(cache=True, inline="always")
def _bound(v, lo, hi, saturate, mask, sign):
    """v (exact, int64) in the accumulator's range [lo, hi]: clamped, or wrapped mod 2^bits."""
    if saturate:
        return min(max(v, lo), hi)
    u = np.uint64(v) & mask
    return np.int64(u) - (np.int64(u & sign) << 1)


@njit(cache=True, inline="always")
def _aligned_add(total, p, s, bits, lo, hi, saturate, mask, sign):
    """(total + p * 2^s in the accumulator, whether that add overflowed), for s >= 0."""
    if p == 0:
        return total, False
    if s >= bits:   # |p| 2^s >= 2^bits: out of range whatever total is
        if saturate:
            return (hi if p > 0 else lo), True
        return total, True   # p * 2^s = 0 mod 2^bits
    # total = q 2^s + r (0 <= r < 2^s): the sum is in range iff q + p is (in units of 2^s)
    q = total >> s
    r = total - (q << s)
    top = (hi - r) >> s
    bottom = -((r - lo) >> s)   # ceil((lo - r) / 2^s)
    if bottom <= q + p <= top:
        return ((q + p) << s) + r, False
    if saturate:
        return (hi if p > 0 else lo), True
    shifted = (np.uint64(p) << np.uint64(s)) & mask
    u = (np.uint64(total) + shifted) & mask
    return np.int64(u) - (np.int64(u & sign) << 1), True


@njit(cache=True, parallel=True)
def _block_gemm(a, bt, sa, sb, block, bits, saturate, checked, c, overflows):
    m, k = a.shape
    n = bt.shape[0]
    lo = -(np.int64(1) << (bits - 1))
    hi = (np.int64(1) << (bits - 1)) - 1
    mask = np.uint64((1 << bits) - 1)
    sign = np.uint64(1 << (bits - 1))
    for i in prange(m):
        count = 0
        for j in range(n):
            total = np.int64(0)
            for blk in range(sa.shape[1]):
                k0 = blk * block
                k1 = min(k0 + block, k)
                p = np.int64(0)
                if checked:   # every add of the block's sum kept in range
                    for kk in range(k0, k1):
                        v = p + np.int64(a[i, kk]) * np.int64(bt[j, kk])
                        if v < lo or v > hi:
                            count += 1
                            v = _bound(v, lo, hi, saturate, mask, sign)
                        p = v
                else:
                    for kk in range(k0, k1):
                        p += np.int64(a[i, kk]) * np.int64(bt[j, kk])
                total, over = _aligned_add(total, p, sa[i, blk] + sb[blk, j], bits, lo, hi,
                                           saturate, mask, sign)
                count += over
            c[i, j] = total
        overflows[i] = count
