"""Affine quantization of a float tensor into b-bit codes, one range per group.

A group is the whole tensor, a row or a column. The range [lo, hi] is cut into B = 2^b - 1 bins
(scale = (hi - lo) / B) and x is rounded to a bin edge u in 0..B. Codes are kept small, as narrow
accumulators need: for data with negative values the code is centred, q = u - 2^(b-1), a signed
b-bit value standing for `offset + scale * q` with offset = lo + scale * 2^(b-1); for
non-negative data (lo >= 0, e.g. ReLU outputs) it stays unsigned, q = u, with offset = lo, so
that zeros, the most common value, are code 0 and add nothing to a sum. The offset stays a real
number (no integer zero point), so stochastic rounding is exactly unbiased whenever the range
covers the data; integer hardware applies it after the GEMM as a rank-1 correction with the other
operand's column or row sums (see `fqtsim.schedule`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

GROUP_AXES = {"tensor": None, "rows": 1, "cols": 0}  # axis reduced to get one range per group


class NonFiniteError(ValueError):
    """A tensor to quantize holds NaN or Inf: there is no range to quantize it to."""


@dataclass(frozen=True)
class Quantized:
    """Integer codes plus what turns them back into floats.

    `codes` (int8 signed or uint8 unsigned b-bit values, x's shape), `scale` and `offset` broadcast against it
    (shape (1, 1), (N, 1) or (1, D) for tensor, rows, cols), `affine`: whether the offset can be
    nonzero (symmetric codes have none), `transform` (BHQ's block Householder, or None) to undo
    after dequantizing, `clipped`: how many values fell outside a given range, `ranges`: the
    groups' hi - lo.
    """
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    bits: int
    group: str
    affine: bool = True
    transform: object = None
    clipped: int = 0
    ranges: np.ndarray = field(default=None, repr=False)
    observed: tuple = (0.0, 0.0)   # min and max of the data quantized (after BHQ's transform)

    @property
    def T(self) -> "Quantized":
        """The transposed operand (rows become columns); a transform cannot be transposed."""
        if self.transform is not None:
            raise ValueError("a BHQ-quantized tensor mixes rows and cannot be used transposed")
        group = {"rows": "cols", "cols": "rows"}.get(self.group, self.group)
        return replace(self, codes=self.codes.T, scale=self.scale.T, offset=self.offset.T,
                       group=group, ranges=None if self.ranges is None else self.ranges.T)

    def dequantize(self) -> np.ndarray:
        """The exact float equivalent, in float64 (with BHQ's inverse transform applied)."""
        y = self.offset + self.scale * self.codes.astype(np.float64)
        return y if self.transform is None else self.transform.inverse(y)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits: got {bits!r}; quantizers take 2..8 bits")
    return int(bits)


def group_range(x: np.ndarray, group: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (min, max), shaped to broadcast against x."""
    axis = GROUP_AXES[group]
    return x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)


def quantize_affine(x: np.ndarray, bits: int, group: str, *, stochastic: bool,
                    rng: np.random.Generator | None = None, lo=None, hi=None) -> Quantized:
    """Quantize 2-D `x` to `bits`-bit codes with one range per `group`.

    Ranges are x's own (dynamic) unless `lo`/`hi` are given (delayed: values beyond them are
    clipped and counted). Stochastic rounding floor(y + u), u ~ U[0, 1), is unbiased; otherwise
    round to nearest.
    """
    bits = check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x: got a {x.ndim}-D array; quantizers take 2-D (rows = samples) arrays")
    if not np.isfinite(x).all():
        bad = np.count_nonzero(~np.isfinite(x))
        raise NonFiniteError(f"x: {bad} NaN or Inf values; a diverged loss or a bad input, "
                             f"lower the learning rate or check the data")
    top = (1 << bits) - 1
    own_lo, own_hi = group_range(x, group)
    lo = own_lo if lo is None else np.broadcast_to(np.asarray(lo, np.float64), own_lo.shape)
    hi = own_hi if hi is None else np.broadcast_to(np.asarray(hi, np.float64), own_hi.shape)
    width = hi - lo
    scale = np.where(width > 0, width / top, 1.0)  # a constant group is exact with any scale
    y = (x - lo) / scale
    if stochastic:
        rng = rng if rng is not None else np.random.default_rng()
        y = np.floor(y + rng.random(x.shape))
    else:
        y = np.floor(y + 0.5)
    clipped = int(np.count_nonzero((x < lo) | (x > hi)))
    if (lo >= 0).all():   # non-negative data (ReLU outputs): unsigned codes, zero stays code 0
        codes, shift = np.clip(y, 0, top).astype(np.uint8), 0
    else:
        shift = 1 << (bits - 1)
        codes = (np.clip(y, 0, top) - shift).astype(np.int8)
    return Quantized(codes, scale, lo + scale * shift, bits, group, clipped=clipped, ranges=width,
                     observed=(float(x.min()), float(x.max())))
