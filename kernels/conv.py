"""A convolution's im2col rows, built from coded feature maps, and folded back onto them.

The rows are ordered as torch's unfold orders them: one row per output position (sample, output
row, output column), one column per (channel, kernel row, kernel column). The device's numerics
need both directions: the input map's codes unfolded into the forward and weight-gradient
GEMMs' operand, and grad_input's rows folded back (col2im, summing where windows overlap) into
the gradient of the map.
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
