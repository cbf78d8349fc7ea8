"""Quantizers: forward (weights, activations) and gradient (PTQ, PSQ, BHQ, per-column).

Each returns a `Quantized`: integer codes with their scales and offsets (and BHQ's transform), which the integer GEMM consumes, and whose `dequantize()` is the exact float
equivalent. Rows are samples (axis 0), as in the gradient dY of a layer.

    ptq   one range for the whole tensor
    psq   one range per row (sample)
    bhq   block Householder transform across rows, then one range per transformed row
    pcq   one range per column (output feature): the weight-gradient GEMM's quantizer
    mxint blocks of `block` consecutive values along each row share a power-of-two scale
          (`fqtsim.quantizers.mx`): the GEMM's A operand, blocks along its K
    hadamard  each row rotated by a random Hadamard transform R along K (blocks of `block`,
          `fqtsim.quantizers.rotation`), then one range per sample as PSQ; the GEMM's other
          operand is rotated too (`rotate_weight`: R^T W), so R cancels inside the product
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from fqtsim.quantizers.affine import (NonFiniteError, Quantized, as_real_array, check_bits,
                                     check_rng, group_range, quantize_affine)
from fqtsim.quantizers.bhq import BlockHouseholder, SampleRows, block_householder
from fqtsim.quantizers.mx import block_exponents, check_block, quantize_mx
from fqtsim.quantizers.rotation import Rotation, random_rotation
from fqtsim.quantizers.ranges import DelayedRange

GRADIENT_METHODS = ("ptq", "psq", "bhq", "mxint", "hadamard")
_GROUPS = {"ptq": "tensor", "psq": "rows", "bhq": "rows", "pcq": "cols", "mxint": "blocks",
           "hadamard": "rows"}
MX_BLOCK = 32   # mxint's default block: values along K per shared scale

__all__ = ["BlockHouseholder", "DelayedRange", "GRADIENT_METHODS", "NonFiniteError", "Quantized", "fake_quantize",
           "quantize_activation", "quantize_gradient", "quantize_weight", "rotate_weight",
           "variance_bound"]


def quantize_gradient(x: np.ndarray, method: str, bits: int, rng: np.random.Generator | None = None,
                      *, lo=None, hi=None, rows_per_sample: int = 1,
                      zero_exact: bool = False, block: int = MX_BLOCK,
                      rotation: Rotation | None = None) -> Quantized:
    """Stochastically rounded codes of gradient `x` (rows = samples) by `method`.

    `lo`/`hi`: ranges known before the data (delayed policy), shaped per group (BHQ: of the
    transformed rows); values outside are clipped and counted in `clipped`. None: the data's own
    ranges (dynamic policy). `rows_per_sample`: x's rows come in consecutive groups of that many
    per sample (a conv layer's im2col rows, one per output position); PSQ and BHQ then take one
    range, and BHQ one transform row, per sample. `zero_exact` (PTQ only): the range stretched
    so that 0.0 is a code, as the FQT paper's PTQ does (`quantize_affine`). `block`: mxint's
    values per shared scale along each row (mxint takes no ranges: each block's scale is its own);
    hadamard's rotation blocks. `rotation`: hadamard's R (None: a fresh one drawn from `rng`);
    the codes stand for x R, `lo`/`hi` range the rotated rows.
    """
    if not isinstance(method, str) or method not in _GROUPS:
        raise ValueError(f"method: got {method!r}; expected one of {', '.join(_GROUPS)}")
    if zero_exact and method != "ptq":
        raise ValueError(f"zero_exact: stretches PTQ's range; got method {method!r}")
    bits = check_bits(bits)
    x = as_real_array(x)
    if rng is not None:
        check_rng(rng)
    if isinstance(rows_per_sample, (bool, np.bool_)) or \
            not isinstance(rows_per_sample, (int, np.integer)) or rows_per_sample < 1:
        raise ValueError(f"rows_per_sample: got {rows_per_sample!r}; expected an integer >= 1")
    if method == "mxint":
        if lo is not None or hi is not None:
            raise ValueError("lo, hi: mxint takes each block's scale from the block itself; it "
                             "has no range to give")
        return quantize_mx(x, bits, block, rng)
    if method == "hadamard":
        check_block(block)
        rng = check_rng(rng)
        rotation = rotation or random_rotation(x.shape[1], block, rng)
        if not isinstance(rotation, Rotation) or len(rotation.signs) != x.shape[1]:
            raise ValueError(f"rotation: expected a Rotation over the {x.shape[1]} columns of x")
        if not np.isfinite(x).all():   # before the rotation, which would spread them
            raise NonFiniteError(f"x: {np.count_nonzero(~np.isfinite(x))} NaN or Inf values; "
                                 f"a diverged loss or a bad input, lower the learning rate")
        q = quantize_gradient(rotation.columns(x), "psq", bits, rng, lo=lo, hi=hi,
                              rows_per_sample=rows_per_sample)
        return replace(q, rotation=rotation)
    if rows_per_sample > 1 and method in ("psq", "bhq"):
        m, d = x.shape
        if m % rows_per_sample:
            raise ValueError(f"rows_per_sample: {rows_per_sample} does not divide the {m} rows of x")
        q = quantize_gradient(x.reshape(m // rows_per_sample, rows_per_sample * d), method, bits,
                              rng, lo=lo, hi=hi)
        return replace(q, codes=q.codes.reshape(m, d),
                       scale=np.repeat(q.scale, rows_per_sample, axis=0),
                       offset=np.repeat(q.offset, rows_per_sample, axis=0),
                       ranges=np.repeat(q.ranges, rows_per_sample, axis=0),
                       transform=None if q.transform is None else SampleRows(q.transform, rows_per_sample))
    if method != "bhq":
        return quantize_affine(x, bits, _GROUPS[method], stochastic=True, rng=rng, lo=lo, hi=hi,
                               zero_exact=zero_exact)
    if not np.isfinite(x).all():   # before the transform, which would spread them
        raise NonFiniteError(f"x: {np.count_nonzero(~np.isfinite(x))} NaN or Inf values; a "
                             f"diverged loss or a bad input, lower the learning rate or check "
                             f"the data")
    row_lo, row_hi = group_range(x, "rows")
    transform = block_householder((row_hi - row_lo).ravel())
    q = quantize_affine(transform.apply(x), bits, "rows", stochastic=True, rng=rng, lo=lo, hi=hi)
    return replace(q, transform=transform)


def fake_quantize(x: np.ndarray, method: str, bits: int, rng: np.random.Generator | None = None,
                  block: int = MX_BLOCK) -> np.ndarray:
    """Quantize then dequantize (BHQ: then the inverse transform): a float array of x's shape
    (`block`: mxint's values per shared scale)."""
    return quantize_gradient(x, method, bits, rng, block=block).dequantize()


def quantize_weight(w: np.ndarray, bits: int = 8, per_channel: bool = False) -> Quantized:
    """Symmetric round-to-nearest signed weight codes (int8), per tensor or per output channel
    (row of w): zero is exact and needs no zero-point correction."""
    bits = check_bits(bits)
    w = as_real_array(w, "w", ndim=2 if per_channel else None)
    if not np.isfinite(w).all():
        raise NonFiniteError(f"w: {np.count_nonzero(~np.isfinite(w))} NaN or Inf weights; the "
                             f"training diverged, lower the learning rate")
    half = (1 << (bits - 1)) - 1
    peak = np.abs(w).max(axis=1 if per_channel else None, keepdims=True)
    scale = np.where(peak > 0, peak / half, 1.0)
    codes = np.clip(np.rint(w / scale), -half, half).astype(np.int8)
    return Quantized(codes, scale, np.zeros_like(scale), bits, "rows" if per_channel else "tensor",
                     affine=False)


def rotate_weight(w: np.ndarray, rotation: Rotation, bits: int = 8) -> Quantized:
    """Per-tensor weight codes of R^T w (`w`: K x N, the GEMM's B with its rows along K): the
    operand that cancels a hadamard-quantized A's rotation inside A @ B."""
    w = as_real_array(w, "w")
    if len(rotation.signs) != w.shape[0]:
        raise ValueError(f"rotation: over {len(rotation.signs)} values; w has {w.shape[0]} rows")
    return replace(quantize_weight(rotation.rows(w), bits), rotation=rotation, rotated_along=0)


def quantize_activation(x: np.ndarray, bits: int = 8, *, lo=None, hi=None) -> Quantized:
    """Per-tensor affine round-to-nearest activation codes; `lo`/`hi`: a range known before
    the data (delayed), values beyond it clipped and counted."""
    return quantize_affine(x, bits, "tensor", stochastic=False, lo=lo, hi=hi)


def variance_bound(x: np.ndarray, method: str, bits: int, block: int = MX_BLOCK) -> float:
    """Upper bound on E||Q(x) - x||^2 for stochastic rounding (sum over all elements).

    Each SR'd element has variance <= bin^2 / 4. PTQ: N D R(x)^2 / (4 B^2); PSQ:
    D sum_i R(x_i)^2 / (4 B^2); BHQ: the same per transformed row, carried back through
    T^-1 = diag(1/s) H: row l's noise reaches row i with weight H_il^2 / s_i^2. mxint: each
    value's bin is its block's scale (blocks of `block` along the rows).
    """
    top = (1 << check_bits(bits)) - 1
    x = as_real_array(x)
    if not np.isfinite(x).all():
        raise NonFiniteError(f"x: {np.count_nonzero(~np.isfinite(x))} NaN or Inf values; no "
                             f"finite bound")
    n, d = x.shape
    if not isinstance(method, str) or method not in GRADIENT_METHODS:
        raise ValueError(f"method: got {method!r}; expected one of {', '.join(GRADIENT_METHODS)}")
    if method == "ptq":
        return n * d * float(np.ptp(x)) ** 2 / (4 * top**2)
    if method == "psq":
        return d * float((np.ptp(x, axis=1) ** 2).sum()) / (4 * top**2)
    if method == "hadamard":   # PSQ's on the rotated rows, for one draw of R
        return variance_bound(random_rotation(d, block, np.random.default_rng(0)).columns(x),
                              "psq", bits)
    if method == "mxint":   # each value's bin is its block's scale
        scale = np.ldexp(1.0, block_exponents(x, bits, block))
        per_block = np.minimum(block, d - block * np.arange(scale.shape[1]))
        return float((scale**2 * per_block).sum() / 4)
    if method == "bhq":
        t = block_householder(np.ptp(x, axis=1))
        per_row = np.ptp(t.apply(x), axis=1) ** 2 / (4 * top**2) * d   # noise of each T x row
        gain = 1.0 / t.scales**2    # sum_i H_il^2 / s_i^2, from H's three distinct entries
        for rows, v in zip(t.blocks, t.vectors):
            if v is not None:
                inv = 1.0 / t.scales[rows] ** 2
                size, off = len(rows), 2.0 * v[1] * v[1]
                gain[rows[0]] = inv.sum() / size
                gain[rows[1:]] = inv[0] / size + (1 - off) ** 2 * inv[1:] + off**2 * (inv[1:].sum() - inv[1:])
        return float((per_row * gain).sum())
    raise ValueError(f"method: got {method!r}; expected one of {', '.join(GRADIENT_METHODS)}")
