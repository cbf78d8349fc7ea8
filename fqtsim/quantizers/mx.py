"""Block-scaled integer codes (MXINT-style): blocks of consecutive values share a power of two.

Each row of x is cut into blocks of `block` consecutive values (the last one may be short); a
block's values are b-bit symmetric codes q in -(2^(b-1) - 1)..2^(b-1) - 1 times the block's scale
2^e, stored as one exponent byte (E8M0: e in -127..127). The exponent is the least that holds
the block's largest magnitude, e = ceil(log2(max|x| / (2^(b-1) - 1))), so no value is clipped
and stochastic rounding is exactly unbiased; a block of zeros takes its row's least exponent,
which leaves the GEMM's shifts as they are (`kernels.block_gemm` aligns every block to the
row's least). The hardware finds each block's max as the producer's output pipeline writes it:
no range over a whole tensor or sample is needed, so nothing is written at full width first.

The rows are the GEMM's A operand with the blocks along K: dY's rows for dX = dY W (blocks over
output features), dY^T's rows for dW = dY^T X (blocks over samples): one copy per layout.
"""
from __future__ import annotations

import numpy as np

from fqtsim.quantizers.affine import NonFiniteError, Quantized, as_real_array, check_bits, check_rng

E8M0 = (-127, 127)   # the exponents one scale byte holds


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or \
            not 2 <= block <= 256 or block & (block - 1):
        raise ValueError(f"block: got {block!r}; expected a power of two in 2..256 (values per "
                         f"shared scale along K)")
    return int(block)


def block_exponents(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The shared exponent of each block of each row of x (M x ceil(K/block), int64)."""
    m, k = x.shape
    blocks = -(-k // block)
    padded = np.zeros((m, blocks * block))
    padded[:, :k] = np.abs(x)
    peak = padded.reshape(m, blocks, block).max(axis=2)
    top = (1 << (bits - 1)) - 1
    with np.errstate(divide="ignore"):
        mantissa, exp = np.frexp(peak / top)    # peak / top = mantissa 2^exp, 0.5 <= mantissa < 1
    exp = np.where(mantissa == 0.5, exp - 1, exp)   # an exact power of two needs no more
    live = peak > 0
    least = np.where(live, exp, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    least = np.where(live.any(axis=1, keepdims=True), least, 0)
    exp = np.where(live, exp, least)
    return np.clip(exp, *E8M0).astype(np.int64)


def quantize_mx(x: np.ndarray, bits: int, block: int, rng: np.random.Generator | None = None,
                stochastic: bool = True) -> Quantized:
    """b-bit block-scaled codes of 2-D `x`, blocks of `block` along each row; stochastic
    rounding floor(y + u), u ~ U[0, 1) (else to nearest). Values too large for the largest
    scale (2^127) are clipped and counted; values below the smallest flush towards 0."""
    bits, block = check_bits(bits), check_block(block)
    x = as_real_array(x)
    if not np.isfinite(x).all():
        raise NonFiniteError(f"x: {np.count_nonzero(~np.isfinite(x))} NaN or Inf values; a "
                             f"diverged loss or a bad input, lower the learning rate or check "
                             f"the data")
    exp = block_exponents(x, bits, block)
    scale = np.ldexp(1.0, exp)
    y = x / np.repeat(scale, block, axis=1)[:, :x.shape[1]]
    u = check_rng(rng).random(x.shape) if stochastic else 0.5
    top = (1 << (bits - 1)) - 1
    q = np.floor(y + u)
    clipped = int(np.count_nonzero(np.abs(q) > top))
    codes = np.clip(q, -top, top).astype(np.int8)
    return Quantized(codes, scale, np.zeros((1, 1)), bits, "blocks", affine=False,
                     clipped=clipped, observed=(float(x.min()), float(x.max())), block=block)
