"""Slow, obviously correct references for the integer GEMM contract, independent of `kernels`.

`ref_gemm` follows the contract word by word with plain Python integers: one MAC at a time in
ascending k, every add checked against the range, spills as separate adds. Use it on small
cases only (M*N*K of a few thousand). `exact_product` / `wrap` give the answer for cases where
the order does not matter.
"""
import numpy as np


def bounds(bits: int) -> tuple[int, int]:
    """Range of a two's-complement integer of `bits` bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def wrap(x: int, bits: int) -> int:
    """x reduced modulo 2^bits into [-2^(bits-1), 2^(bits-1) - 1]."""
    lo, _ = bounds(bits)
    return (x - lo) % (1 << bits) + lo


def saturate(x: int, bits: int) -> int:
    """x clamped to [-2^(bits-1), 2^(bits-1) - 1]."""
    lo, hi = bounds(bits)
    return min(max(x, lo), hi)


def add(prev: int, addend: int, bits: int, overflow: str) -> tuple[int, bool]:
    """One add step of a `bits`-wide register: (new value, whether the exact sum left the range)."""
    exact = prev + addend
    lo, hi = bounds(bits)
    out_of_range = not lo <= exact <= hi
    if overflow == "wrap":
        return wrap(exact, bits), out_of_range
    if overflow == "saturate":
        return saturate(exact, bits), out_of_range
    raise ValueError(overflow)


def ref_gemm(a, b, acc_bits=32, overflow="wrap", spill_every=None, psum_bits=32):
    """The contract of `kernels.int_gemm`, literally, in Python ints: (c int64 array, counts)."""
    a = [[int(v) for v in row] for row in np.asarray(a)]
    b = [[int(v) for v in row] for row in np.asarray(b)]
    m, k, n = len(a), len(b), len(b[0])
    c = np.zeros((m, n), np.int64)
    overflows = spills = 0
    for i in range(m):
        for j in range(n):
            acc = psum = 0
            for kk in range(k):
                acc, ov = add(acc, a[i][kk] * b[kk][j], acc_bits, overflow)
                overflows += ov
                if spill_every is not None and ((kk + 1) % spill_every == 0 or kk == k - 1):
                    psum, ov = add(psum, acc, psum_bits, overflow)
                    overflows += ov
                    spills += 1
                    acc = 0
            c[i, j] = psum if spill_every is not None else acc
    return c, {"macs": m * n * k, "overflows": overflows, "spills": spills}


def exact_product(a, b) -> np.ndarray:
    """Exact int64 a @ b (no overflow for any code width and K < 2^47)."""
    return np.asarray(a).astype(np.int64) @ np.asarray(b).astype(np.int64)


def wrap_array(x: np.ndarray, bits: int) -> np.ndarray:
    """Elementwise `wrap` of an int64 array."""
    if bits >= 64:
        return np.array(x, np.int64)
    lo, _ = bounds(bits)
    return (x - lo) % (1 << bits) + lo


def ref_gemm_np(a, b, acc_bits=32, overflow="wrap", spill_every=None, psum_bits=32):
    """`ref_gemm` vectorized over the M x N outputs (a Python loop over k only), for cases too
    big for Python ints: the same per-MAC rules in int64, exact while acc_bits, psum_bits <= 62."""
    assert acc_bits <= 62 and psum_bits <= 62
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    m, k = a.shape
    n = b.shape[1]
    acc = np.zeros((m, n), np.int64)
    psum = np.zeros((m, n), np.int64)
    overflows = spills = 0

    def step(prev, addend, bits):
        exact = prev + addend
        lo, hi = bounds(bits)
        out = (exact < lo) | (exact > hi)
        new = wrap_array(exact, bits) if overflow == "wrap" else np.clip(exact, lo, hi)
        return new, int(out.sum())

    for kk in range(k):
        acc, ov = step(acc, np.outer(a[:, kk], b[kk]), acc_bits)
        overflows += ov
        if spill_every is not None and ((kk + 1) % spill_every == 0 or kk == k - 1):
            psum, ov = step(psum, acc, psum_bits)
            overflows += ov
            spills += m * n
            acc = np.zeros((m, n), np.int64)
    c = psum if spill_every is not None else acc
    return c, {"macs": m * n * k, "overflows": overflows, "spills": spills}


def wrap_overflows(a, b, acc_bits: int) -> int:
    """Overflow count of a wrapping accumulator without spills, from the exact running sums S_k:
    step k overflows iff floor((S_k + 2^(B-1)) / 2^B) != floor((S_{k-1} + 2^(B-1)) / 2^B)."""
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    s = np.cumsum(a[:, :, None] * b[None, :, :], axis=1)          # (M, K, N) running sums
    s = np.concatenate([np.zeros_like(s[:, :1]), s], axis=1)
    half = 1 << (acc_bits - 1)
    bucket = (s + half) >> acc_bits                              # floor division by 2^B
    return int((bucket[:, 1:] != bucket[:, :-1]).sum())


def ref_block_gemm(a, a_exp, b, b_exp, block, acc_bits=32, overflow="wrap"):
    """The contract of `kernels.block_gemm`, literally, in Python ints: each block's products
    added one at a time into a fresh register, that sum shifted left by its two exponents above
    the row's and column's least and added into the output's register; every add checked.
    Returns (c, ra, rb, overflows)."""
    a = [[int(v) for v in row] for row in np.asarray(a)]
    b = [[int(v) for v in row] for row in np.asarray(b)]
    a_exp = [[int(v) for v in row] for row in np.asarray(a_exp)]
    b_exp = [[int(v) for v in row] for row in np.asarray(b_exp)]
    m, k, n = len(a), len(b), len(b[0])
    blocks = len(a_exp[0])
    ra = [min(row) for row in a_exp]
    rb = [min(a_exp_col) for a_exp_col in zip(*b_exp)]
    c = np.zeros((m, n), np.int64)
    overflows = 0
    for i in range(m):
        for j in range(n):
            total = 0
            for blk in range(blocks):
                part = 0
                for kk in range(blk * block, min(k, (blk + 1) * block)):
                    part, ov = add(part, a[i][kk] * b[kk][j], acc_bits, overflow)
                    overflows += ov
                shift = a_exp[i][blk] - ra[i] + b_exp[blk][j] - rb[j]
                total, ov = add(total, part << shift, acc_bits, overflow) if part else (total, False)
                overflows += ov
            c[i, j] = total
    return c, np.array(ra), np.array(rb), overflows
