"""Random Hadamard rotations along K: the `hadamard` gradient quantizer's transform.

R = D B, D a diagonal of random signs and B block diagonal of normalized Walsh-Hadamard
matrices H_s / sqrt(s) over consecutive segments of K: blocks of `block`, and a tail that is not
a multiple of it cut into the largest powers of two that fit (K = 10, block 32: 8 and 2). R is
orthogonal, so a GEMM of both rotated operands is the GEMM of the originals:

    dX = dY W = (dY R) (R^T W)

and a gradient row's outliers are spread over its block before it is quantized (per sample,
as PSQ does). Each segment is applied as a fast transform: log2(s) stages of s adds (`adds`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def segments(k: int, block: int) -> tuple:
    """(start, size) of each Hadamard segment of a length-k axis: blocks of `block`, then the
    tail in decreasing powers of two."""
    out, start = [], 0
    while start < k:
        size = min(block, 1 << int(np.log2(k - start)))
        out.append((start, size))
        start += size
    return tuple(out)


def rotation_adds(k: int, block: int) -> int:
    """Adds (and subtracts) of one length-k vector's fast Walsh-Hadamard transform."""
    return sum(size * int(np.log2(size)) for _, size in segments(k, block))


def _fwht(x: np.ndarray, axis: int) -> np.ndarray:
    """Normalized Walsh-Hadamard transform of x along `axis` (its length a power of two)."""
    y = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    lead, n = y.shape[:-1], y.shape[-1]
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = np.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        y = y.reshape(*lead, n)
        h *= 2
    return np.moveaxis(y / np.sqrt(n), -1, axis)


@dataclass(frozen=True, eq=False)
class Rotation:
    """R = D B over a length-k axis: `signs` (k,) of D and the `segments` of B."""
    signs: np.ndarray
    segments: tuple

    @property
    def adds(self) -> int:
        """Adds of rotating one vector (one row of dY, one column of W)."""
        return sum(size * int(np.log2(size)) for _, size in self.segments)

    def _blocks(self, x: np.ndarray, axis: int) -> np.ndarray:
        out = np.empty(x.shape, np.float64)
        for start, size in self.segments:
            part = [slice(None)] * x.ndim
            part[axis] = slice(start, start + size)
            out[tuple(part)] = _fwht(x[tuple(part)], axis)
        return out

    def columns(self, x: np.ndarray) -> np.ndarray:
        """x R: each row of x (M x K) rotated (B is symmetric: B^T = B)."""
        return self._blocks(x * self.signs, 1)

    def uncolumns(self, y: np.ndarray) -> np.ndarray:
        """y R^T: back from `columns`."""
        return self._blocks(y, 1) * self.signs

    def rows(self, w: np.ndarray) -> np.ndarray:
        """R^T w: each column of w (K x N) rotated, the GEMM's other operand."""
        return self._blocks(w * self.signs[:, None], 0)

    def unrows(self, v: np.ndarray) -> np.ndarray:
        """R v: back from `rows`."""
        return self._blocks(v, 0) * self.signs[:, None]


def random_rotation(k: int, block: int, rng: np.random.Generator) -> Rotation:
    """A fresh R over a length-k axis, its signs drawn from `rng`."""
    signs = rng.integers(0, 2, k) * 2.0 - 1.0
    return Rotation(signs, segments(k, block))
