"""A convolution's im2col rows, built from coded feature maps, and folded back onto them.

The rows are ordered as torch's unfold orders them: one row per output position (sample, output
row, output column), one column per (channel, kernel row, kernel column). The device's numerics
need both directions: the input map's codes unfolded into the forward and weight-gradient
GEMMs' operand, and grad_input's rows folded back (col2im, summing where windows overlap) into
the gradient of the map. And for the mapper, the distinct input pixels a band of rows reads.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def unfold_codes(codes, kernel, stride, padding, fill, out):
    """The im2col rows of coded feature maps `codes` (N, C, H, W), as torch's unfold orders them
    (rows: sample, output row, output column; columns: channel, kernel row, kernel column), into
    `out`, with `fill` (the code of 0.0) where a window reaches into the padding."""
    n, c, h, w = codes.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    for s in range(n):
        for y in range(oh):
            for x in range(ow):
                row = (s * oh + y) * ow + x
                for ch in range(c):
                    for i in range(kh):
                        yy = y * sh - ph + i
                        for j in range(kw):
                            xx = x * sw - pw + j
                            inside = 0 <= yy < h and 0 <= xx < w
                            out[row, (ch * kh + i) * kw + j] = codes[s, ch, yy, xx] if inside else fill


@njit(cache=True)
def fold_rows(rows, samples, channels, h, w, kernel, stride, padding):
    """The (samples, channels, h, w) map whose im2col rows' gradient is `rows`: each row entry
    added to the input element its window position covers (entries over the padding dropped),
    in float64, row by row."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.zeros((samples, channels, h, w))
    for s in range(samples):
        for y in range(oh):
            for x in range(ow):
                row = (s * oh + y) * ow + x
                for ch in range(channels):
                    for i in range(kh):
                        yy = y * sh - ph + i
                        if 0 <= yy < h:
                            for j in range(kw):
                                xx = x * sw - pw + j
                                if 0 <= xx < w:
                                    out[s, ch, yy, xx] += rows[row, (ch * kh + i) * kw + j]
    return out


# Distinct input pixels under im2col rows, for `fqtsim.hardware.conv` (whose docstring derives
# the count): the mapper asks for them for every tile size it tries, hundreds of small arrays
# per convolution, where numpy's per-call cost dominated. An axis is (out, size, stride, pad,
# taps) and its prefix sums of disjoint windows.

@njit(inline="always", cache=True)
def _span(ax, cum, a, b):
    """Distinct inputs under the windows of outputs a..b of axis `ax` (inclusive; a > b: none)."""
    out, size, stride, pad, taps = ax
    if a > b:
        return 0
    if stride <= taps:   # windows touch or overlap: one interval
        lo = max(a * stride - pad, 0)
        hi = min(b * stride - pad + taps - 1, size - 1)
        return max(hi - lo + 1, 0)
    return cum[min(max(b + 1, 0), out)] - cum[min(max(a, 0), out)]


@njit(inline="always", cache=True)
def _overlap(ax, cum, a, b):
    """Inputs under both the windows of outputs a.. (to the last) and those of ..b."""
    out, size, stride, pad, taps = ax
    if stride <= taps:
        lo = max(a * stride - pad, 0)
        hi = min(b * stride - pad + taps - 1, size - 1)
        return max(hi - lo + 1, 0)
    return _span(ax, cum, a, b)   # disjoint windows: shared only by outputs in both ranges


@njit(inline="always", cache=True)
def _shared(ax, o, a, b):
    """Inputs under output o's window and also under those of outputs a..b (o next to them)."""
    out, size, stride, pad, taps = ax
    if stride > taps or a > b:
        return 0
    lo = max(max(o * stride, a * stride) - pad, 0)
    hi = min(min(o, b) * stride - pad + taps - 1, size - 1)
    return max(hi - lo + 1, 0)


@njit(inline="always", cache=True)
def _segment(rows, r_cum, cols, c_cum, ow, p0, p1):
    """Distinct pixels under output positions [p0, p1) of one sample (p0 < p1 <= positions)."""
    y0, x0 = p0 // ow, p0 % ow
    y1, x1 = (p1 - 1) // ow, (p1 - 1) % ow
    if y0 == y1:
        return _span(rows, r_cum, y0, y0) * _span(cols, c_cum, x0, x1)
    # several output rows: a first row from x0, full rows between, a last row up to x1; an
    # input row takes the columns of every output row whose window covers it
    full, first = _span(cols, c_cum, 0, ow - 1), _span(cols, c_cum, x0, ow - 1)
    last = _span(cols, c_cum, 0, x1)
    mid = _span(rows, r_cum, y0 + 1, y1 - 1)
    top = _span(rows, r_cum, y0, y0)          # input rows of the first output row
    bottom = _span(rows, r_cum, y1, y1)
    both = _overlap(rows, r_cum, y1, y0) if y1 - y0 == 1 else 0   # rows under first and last only
    top_only = top - both - _shared(rows, y0, y0 + 1, y1 - 1)
    bottom_only = bottom - both - _shared(rows, y1, y0 + 1, y1 - 1)
    either = first + last - _overlap(cols, c_cum, x0, x1)
    return mid * full + top_only * first + bottom_only * last + both * either


@njit(cache=True)
def pixels_of(rows, r_cum, cols, c_cum, ow, per, r0, r1):
    """Distinct (sample, pixel) pairs under im2col rows [r0[i], r1[i]) for each i: a tail of one
    sample, whole samples, a head of another."""
    whole = _segment(rows, r_cum, cols, c_cum, ow, 0, per)
    out = np.zeros(len(r0), np.int64)
    for i in range(len(r0)):
        a, b = r0[i], r1[i]
        if b <= a:
            continue
        s0, s1 = a // per, (b - 1) // per
        p0, p1 = a % per, (b - 1) % per + 1
        if s0 == s1:
            out[i] = _segment(rows, r_cum, cols, c_cum, ow, p0, p1)
        else:
            out[i] = (_segment(rows, r_cum, cols, c_cum, ow, p0, per) + (s1 - s0 - 1) * whole
                      + _segment(rows, r_cum, cols, c_cum, ow, 0, p1))
    return out
