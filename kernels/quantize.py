"""Quantize-and-pack in one pass: float64 values to b-bit integer codes with per-group ranges.

`fqtsim.quantizers` computes each group's range and scale (small arrays) and hands the per-element
work here, where numpy would make a temporary array per step (subtract, divide, add the rounding
offset, floor, clip, shift, cast, and a pass to count clips): one loop instead, with the same
float64 operations in the same order, so the codes are identical to numpy's.

Ranges and scales come as 2-D arrays that broadcast against x: (1, 1) per tensor, (N, 1) per row,
(1, D) per column.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

TENSOR, ROWS, COLS = 0, 1, 2     # group layouts, as `group_minmax` takes them


@njit(cache=True)
def group_minmax(x, group):
    """Per-group (min, max) of 2-D float64 x, shaped to broadcast against it, and the number of
    NaN or infinite values (with any, the ranges are meaningless)."""
    n, d = x.shape
    rows = n if group == ROWS else 1
    cols = d if group == COLS else 1
    lo = np.full((rows, cols), np.inf)
    hi = np.full((rows, cols), -np.inf)
    bad = 0
    for i in range(n):
        gi = i if group == ROWS else 0
        for j in range(d):
            gj = j if group == COLS else 0
            v = x[i, j]
            if not math.isfinite(v):
                bad += 1
            if v < lo[gi, gj]:
                lo[gi, gj] = v
            if v > hi[gi, gj]:
                hi[gi, gj] = v
    return lo, hi, bad


@njit(cache=True)
def encode(x, lo, hi, scale, u, top, shift, count_clips, out):
    """out = clip(floor((x - lo) / scale + u), 0, top) - shift, u the uniform draws of stochastic
    rounding (an array of x's shape) or 0.5 everywhere (a (1, 1) array: to nearest). Returns how
    many values lie outside [lo, hi] (0 unless `count_clips`)."""
    n, d = x.shape
    clipped = 0
    per_row, per_col = lo.shape[0] > 1, lo.shape[1] > 1
    draws = u.shape[0] > 1 or u.shape[1] > 1
    half = u[0, 0]
    for i in range(n):
        gi = i if per_row else 0
        for j in range(d):
            gj = j if per_col else 0
            v = x[i, j]
            low = lo[gi, gj]
            y = math.floor((v - low) / scale[gi, gj] + (u[i, j] if draws else half))
            y = min(max(y, 0.0), top)
            out[i, j] = int(y) - shift
            if count_clips and (v < low or v > hi[gi, gj]):
                clipped += 1
    return clipped


@njit(cache=True)
def _at(v, i, j):
    """v[i, j] of a (1, 1), (N, 1) or (1, D) array broadcast against an N x D one."""
    return v[i if v.shape[0] > 1 else 0, j if v.shape[1] > 1 else 0]


@njit(cache=True)
def dequantize_product(c, a_scale, b_scale, a_offset, b_offset, a_codes, b_codes, a_affine,
                       b_affine):
    """The float product of two affine-coded operands from the integer product c = qa @ qb:
    sa (c sb) + oa (colsum(qb) sb) + (sa rowsum(qa)) ob + K oa ob, each term where its
    operand has an offset, added in that order (numpy's order: the same float64 result)."""
    m, n = c.shape
    k = a_codes.shape[1]
    colsum = np.zeros(n, np.int64)
    if a_affine:
        for kk in range(k):
            for j in range(n):
                colsum[j] += b_codes[kk, j]
    rowsum = np.zeros(m, np.int64)
    if b_affine:
        for i in range(m):
            total = 0
            for kk in range(k):
                total += a_codes[i, kk]
            rowsum[i] = total
    out = np.empty((m, n))
    for i in range(m):
        for j in range(n):
            sa, sb = _at(a_scale, i, j), _at(b_scale, i, j)
            t = sa * (float(c[i, j]) * sb)
            if a_affine:
                t += _at(a_offset, i, j) * (float(colsum[j]) * sb)
            if b_affine:
                t += (sa * float(rowsum[i])) * _at(b_offset, i, j)
            if a_affine and b_affine:
                t += (k * _at(a_offset, i, j)) * _at(b_offset, i, j)
            out[i, j] = t
    return out
