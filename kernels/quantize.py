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
    lo = np.full((n if group == ROWS else 1, d if group == COLS else 1), np.inf)
    hi = np.full(lo.shape, -np.inf)
    bad = 0
    for i in range(n):
        if group == COLS:
            for j in range(d):
                v = x[i, j]
                bad += not abs(v) < np.inf
                lo[0, j] = min(lo[0, j], v)
                hi[0, j] = max(hi[0, j], v)
        else:
            gi = i if group == ROWS else 0
            low, high = lo[gi, 0], hi[gi, 0]
            for j in range(d):
                v = x[i, j]
                bad += not abs(v) < np.inf
                low = min(low, v)
                high = max(high, v)
            lo[gi, 0], hi[gi, 0] = low, high
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
        if per_col:
            for j in range(d):
                v, low, high = x[i, j], lo[0, j], hi[0, j]
                y = math.floor((v - low) / scale[0, j] + (u[i, j] if draws else half))
                out[i, j] = int(min(max(y, 0.0), top)) - shift
                clipped += (v < low) | (v > high)
        else:
            low, high, step = lo[gi, 0], hi[gi, 0], scale[gi, 0]
            for j in range(d):
                v = x[i, j]
                y = math.floor((v - low) / step + (u[i, j] if draws else half))
                out[i, j] = int(min(max(y, 0.0), top)) - shift
                clipped += (v < low) | (v > high)
    return clipped if count_clips else 0


@njit(cache=True)
def _row(v, n):
    """(1, 1) or (1, n) v as a vector of n."""
    out = np.empty(n)
    for j in range(n):
        out[j] = v[0, j if v.shape[1] > 1 else 0]
    return out


@njit(cache=True)
def dequantize_product(c, a_scale, b_scale, a_offset, b_offset, a_codes, b_codes, a_affine,
                       b_affine):
    """The float product of two affine-coded operands from the integer product c = qa @ qb:
    sa (c sb) + oa (colsum(qb) sb) + (sa rowsum(qa)) ob + K oa ob, each term where its
    operand has an offset, added in that order (numpy's order: the same float64 result)."""
    m, n = c.shape
    k = a_codes.shape[1]
    sb, ob = _row(b_scale, n), _row(b_offset, n)
    colterm = np.zeros(n)    # colsum(qb) sb
    if a_affine:
        colsum = np.zeros(n, np.int64)
        for kk in range(k):
            for j in range(n):
                colsum[j] += b_codes[kk, j]
        for j in range(n):
            colterm[j] = float(colsum[j]) * sb[j]
    out = np.empty((m, n))
    for i in range(m):
        gi = i if a_scale.shape[0] > 1 else 0
        sa, oa = a_scale[gi, 0], a_offset[gi, 0]
        rowterm = 0.0        # sa rowsum(qa)
        if b_affine:
            total = 0
            for kk in range(k):
                total += a_codes[i, kk]
            rowterm = sa * float(total)
        kterm = k * oa
        for j in range(n):
            t = sa * (float(c[i, j]) * sb[j])
            if a_affine:
                t += oa * colterm[j]
            if b_affine:
                t += rowterm * ob[j]
            if a_affine and b_affine:
                t += kterm * ob[j]
            out[i, j] = t
    return out

