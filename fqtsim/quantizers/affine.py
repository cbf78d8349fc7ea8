"""Affine quantization of a float tensor into b-bit codes, one range per group.

A group is the whole tensor, a row or a column. The range [lo, hi] is cut into B = 2^b - 1 bins
(scale = (hi - lo) / B) and x is rounded to a bin edge u in 0..B. Codes are kept small, as narrow
accumulators need: for data with negative values the code is centred, q = u - 2^(b-1), a signed
b-bit value standing for `offset + scale * q` with offset = lo + scale * 2^(b-1); for
non-negative data (lo >= 0, e.g. ReLU outputs) it stays unsigned, q = u, with offset = lo, so
that zeros, the most common value, are code 0 and add nothing to a sum. The offset stays a real
number (no integer zero point), so stochastic rounding is exactly unbiased whenever the range
covers the data; integer hardware applies it after the GEMM as a rank-1 correction with the other
operand's column or row sums (see `fqtsim.simulation.schedule`).

`zero_exact=True` is the other convention (the FQT paper's PTQ): the range is first stretched to
take in 0.0 and to put it on a code, lo = -z scale and hi = (B - z) scale with an integer zero
point z, the least such scale that still covers [lo, hi]; 0.0 then quantizes to code z exactly
and dequantizes to 0.0 exactly, and stochastic rounding stays unbiased within the stretched range
(its bins are up to B / (B - 1) wider: more variance, never bias). Codes, scales and offsets keep
their form, so integer hardware runs them at the same cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from kernels.quantize import COLS, ROWS, TENSOR, encode, group_minmax

GROUP_AXES = {"tensor": None, "rows": 1, "cols": 0}  # axis reduced to get one range per group
_LAYOUTS = {"tensor": TENSOR, "rows": ROWS, "cols": COLS}
_HALF = np.full((1, 1), 0.5)   # the rounding offset of round to nearest, for every element


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
    block: int | None = None   # group "blocks": `block` consecutive values of a row share a
                               # power-of-two scale (scale: one per row and block)
    rotation: object = None    # the hadamard quantizer's R (`fqtsim.quantizers.rotation`): the
    rotated_along: int = 1     # codes stand for x R (along the columns, 1) or R^T w (rows, 0)

    @property
    def T(self) -> "Quantized":
        """The transposed operand (rows become columns); a transform cannot be transposed."""
        if self.transform is not None:
            raise ValueError("a BHQ-quantized tensor mixes rows and cannot be used transposed")
        if self.block is not None or self.rotation is not None:
            raise ValueError("a block-scaled or rotated tensor is laid out along its rows; "
                             "quantize its transpose instead of transposing its codes")
        group = {"rows": "cols", "cols": "rows"}.get(self.group, self.group)
        return replace(self, codes=self.codes.T, scale=self.scale.T, offset=self.offset.T,
                       group=group, ranges=None if self.ranges is None else self.ranges.T)

    def dequantize(self) -> np.ndarray:
        """The exact float equivalent, in float64 (with BHQ's inverse transform applied)."""
        scale = self.scale if self.block is None else \
            np.repeat(self.scale, self.block, axis=1)[:, :self.codes.shape[1]]
        y = self.offset + scale * self.codes.astype(np.float64)
        if self.rotation is not None:   # back to the basis of the tensor quantized
            y = self.rotation.uncolumns(y) if self.rotated_along else self.rotation.unrows(y)
        return y if self.transform is None else self.transform.inverse(y)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits: got {bits!r}; quantizers take 2..8 bits")
    return int(bits)


def as_real_array(x, name: str = "x", ndim: int | None = 2) -> np.ndarray:
    """`x` as a float64 array, refusing what has no quantization: non-numbers, complex values,
    the wrong number of dimensions (`ndim`, None: any) and empty arrays."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):   # ragged nested lists
        raise ValueError(f"{name}: got a {type(x).__name__} that is not a rectangular array of "
                         f"numbers") from None
    if arr.dtype.kind == "c":
        raise ValueError(f"{name}: complex values ({arr.dtype}); quantizers take real arrays "
                         f"(quantize x.real and x.imag separately)")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: dtype {arr.dtype} is not a real number type; expected an array "
                         f"of floats or integers")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: got a {arr.ndim}-D array; quantizers take {ndim}-D "
                         f"(rows = samples) arrays")
    if arr.size == 0:
        raise ValueError(f"{name}: shape {arr.shape} holds no values; quantizers need at least "
                         f"one row and one column")
    return arr.astype(np.float64, copy=False)


def check_rng(rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: got {rng!r} ({type(rng).__name__}); expected a "
                        f"numpy.random.Generator (np.random.default_rng(seed)) or None")
    return rng


def group_range(x: np.ndarray, group: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (min, max), shaped to broadcast against x."""
    axis = GROUP_AXES[group]
    return x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)


def quantize_affine(x: np.ndarray, bits: int, group: str, *, stochastic: bool,
                    rng: np.random.Generator | None = None, lo=None, hi=None,
                    zero_exact: bool = False) -> Quantized:
    """Quantize 2-D `x` to `bits`-bit codes with one range per `group`.

    Ranges are x's own (dynamic) unless `lo`/`hi` are given (delayed: values beyond them are
    clipped and counted). Stochastic rounding floor(y + u), u ~ U[0, 1), is unbiased; otherwise
    round to nearest. `zero_exact`: each range stretched so that 0.0 is a code (`zero_point_range`).
    """
    bits = check_bits(bits)
    x = as_real_array(x)
    if group not in GROUP_AXES:
        raise ValueError(f"group: got {group!r}; expected one of {', '.join(GROUP_AXES)}")
    top = (1 << bits) - 1
    own_lo, own_hi, bad = group_minmax(x, _LAYOUTS[group])
    if bad:   # a NaN or an infinity anywhere: a diverged loss or a bad input
        raise NonFiniteError(f"x: {bad} NaN or Inf values; a diverged loss or a bad input, "
                             f"lower the learning rate or check the data")
    if (lo is None) != (hi is None):
        raise ValueError("lo, hi: give both (a delayed range) or neither (the data's own range)")
    if lo is not None:
        lo, hi = (_given_range(label, v, own_lo.shape, group) for label, v in (("lo", lo), ("hi", hi)))
        if (lo > hi).any():
            raise ValueError(f"lo, hi: lo exceeds hi in {np.count_nonzero(lo > hi)} groups; a "
                             f"range needs lo <= hi")
    else:
        lo, hi = own_lo, own_hi
    given = lo is not own_lo
    if zero_exact:
        lo, hi, scale, zero = zero_point_range(lo, hi, top)
    width = hi - lo
    if not zero_exact:
        scale = np.where(width > 0, width / top, 1.0)  # a constant group is exact with any scale
    # stochastic rounding floor(y + u), u ~ U[0, 1); to nearest floor(y + 0.5)
    u = check_rng(rng).random(x.shape) if stochastic else _HALF
    if (lo >= 0).all():   # non-negative data (ReLU outputs): unsigned codes, zero stays code 0
        codes, shift = np.empty(x.shape, np.uint8), 0
    else:
        codes, shift = np.empty(x.shape, np.int8), 1 << (bits - 1)
    # own ranges clip nothing
    clipped = encode(x, lo, hi, scale, u, top, shift, given, codes)
    # zero_exact: 0.0's code (z - shift) dequantizes to scale (shift - z) + scale (z - shift) = 0
    offset = scale * (shift - zero) if zero_exact else lo + scale * shift
    return Quantized(codes, scale, offset, bits, group, clipped=clipped, ranges=width,
                     observed=(float(own_lo.min()), float(own_hi.max())))


def zero_point_range(lo: np.ndarray, hi: np.ndarray, top: int):
    """[lo, hi] per group stretched so that 0.0 is a code: (lo', hi', scale, z) with lo' = -z
    scale, hi' = (top - z) scale, z an integer in 0..top, lo' <= min(lo, 0), hi' >= max(hi, 0) and
    the least such scale (z is the floor or the ceiling of where 0 falls in the range). The scale
    is rounded up to 44 significant bits, so that z scale is exact in float64 and 0.0's code
    computes to z exactly."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    width = hi - lo
    where = np.where(width > 0, top * -lo / np.where(width > 0, width, 1.0), 0.0)
    where = np.clip(where, 0, top)   # top * a / a may round above top

    def least_scale(z):   # the least scale with zero point z that covers [lo, hi]
        below = np.where(z > 0, -lo / np.maximum(z, 1.0), np.where(lo < 0, np.inf, 0.0))
        above = np.where(z < top, hi / np.maximum(top - z, 1.0), np.where(hi > 0, np.inf, 0.0))
        return np.maximum(below, above)

    down, up = np.floor(where), np.ceil(where)
    scale_down, scale_up = least_scale(down), least_scale(up)
    zero = np.where(scale_up < scale_down, up, down)
    scale = np.minimum(scale_down, scale_up)
    scale = np.where(scale > 0, scale, 1.0)   # a group of zeros is exact with any scale
    mantissa, exponent = np.frexp(scale)
    scale = np.ldexp(np.ceil(np.ldexp(mantissa, 44)), exponent - 44)
    return -zero * scale, (top - zero) * scale, scale, zero


def _given_range(label: str, v, shape: tuple, group: str) -> np.ndarray:
    """A delayed range bound as a float array of the groups' shape, or a ValueError."""
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{label}: got {v!r}; expected a real number or an array of them")
    if not np.isfinite(arr).all():
        raise ValueError(f"{label}: NaN or Inf in a given range; expected finite numbers")
    try:
        return np.broadcast_to(arr.astype(np.float64), shape)
    except ValueError:
        raise ValueError(f"{label}: shape {arr.shape} does not broadcast to {shape}, the shape of "
                         f"one value per {group} group") from None
