"""Block Householder transform of BHQ: spread each large-range row over a block of small rows.

T acts on the sample (row) dimension. Rows are sorted by range; each of the G largest starts a block
and the z smallest are dealt to the blocks in proportion to the large rows' ranges. In a block of n
rows, T_block = H_n diag(s) with H_n = I - 2 v v^T the reflection that maps e_1 onto 1/sqrt(n) * 1,
so the large row is shared evenly by all n rows, and s the row scales of the paper (s1 for the large
row, s2 for the rest). H_n is symmetric and orthogonal, so T^-1 = diag(1/s) H_n.

Both directions are applied as Householder products, x - 2 v (v^T x), in O(N * D): no N x N matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockHouseholder:
    """The transform: `blocks` (row indices, large row first), per-row `scales` (N,), each
    block's reflection vector `v` (unit length, or None for a block of one row), and the row
    `ranges` (N,) it was built from (the keys hardware sorts)."""
    blocks: tuple
    vectors: tuple
    scales: np.ndarray
    ranges: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """T x: scale the rows, then reflect each block."""
        y = x * self.scales[:, None]
        return self._reflect(y)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """T^-1 y: reflect each block back, then unscale the rows."""
        return self._reflect(y) / self.scales[:, None]

    def _reflect(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float64, copy=True)
        for rows, v in zip(self.blocks, self.vectors):
            if v is not None:
                xb = out[rows]                                   # (n, D)
                out[rows] = xb - 2.0 * np.outer(v, v @ xb)       # (n,1) x (1,D)
        return out


@dataclass(frozen=True)
class SampleRows:
    """A transform over samples, applied to a matrix whose rows come `per` to a sample (im2col)."""
    transform: BlockHouseholder
    per: int

    def _samples(self, x, fn):
        m, d = x.shape
        return fn(x.reshape(m // self.per, self.per * d)).reshape(m, d)

    def apply(self, x):
        return self._samples(x, self.transform.apply)

    def inverse(self, y):
        return self._samples(y, self.transform.inverse)

    @property
    def blocks(self) -> tuple:
        """The blocks as matrix rows: each sample stands for its `per` consecutive rows."""
        return tuple((np.asarray(b)[:, None] * self.per + np.arange(self.per)).ravel()
                     for b in self.transform.blocks)

    @property
    def ranges(self) -> np.ndarray:
        return self.transform.ranges


def reflection(n: int) -> tuple[np.ndarray, float]:
    """Unit v with (I - 2 v v^T) e_1 = 1/sqrt(n) * 1, and q_n = max |entry| of that reflection."""
    u = np.full(n, 1.0 / np.sqrt(n))
    u[0] -= 1.0
    v = u / np.linalg.norm(u)
    off = 2.0 * v[1] * v[1]          # the small rows' entries: 1 - off on the diagonal, -off off it
    q = max(1.0 / np.sqrt(n), abs(1.0 - off), off if n > 2 else 0.0)
    return v, q


def count_small_rows(lam: np.ndarray) -> int:
    """z: the smallest z >= 1 with z * lam[N-z-1] > sum(lam[:N-z]) (lam sorted descending).

    Falls back to z = N - 1 (one block) when no z qualifies, as for N = 2 with equal ranges.
    """
    n = len(lam)
    prefix = np.cumsum(lam)
    for z in range(1, n):
        top = prefix[n - z - 1]
        if top > 0 and z * lam[n - z - 1] > top:
            return z
    return n - 1


def block_householder(ranges: np.ndarray) -> BlockHouseholder:
    """Build the transform from per-row ranges (N,); data dependent, every call."""
    ranges = np.asarray(ranges, dtype=np.float64).ravel()
    n = len(ranges)
    order = np.argsort(-ranges, kind="stable")          # descending range; ties by row index
    lam = ranges[order]
    if n == 1 or lam[0] == 0:
        return BlockHouseholder((order,), (None,), np.ones(n), ranges)  # nothing to spread
    z = count_small_rows(lam)
    g = n - z
    large, small = order[:g], order[g:]
    # deal small rows (descending) to blocks in proportion to the large rows' ranges
    cuts = np.rint(z * np.cumsum(lam[:g]) / lam[:g].sum()).astype(int)
    starts = np.concatenate(([0], cuts[:-1]))
    scales = np.ones(n)
    blocks, vectors = [], []
    for i in range(g):
        rows = np.concatenate(([large[i]], small[starts[i]:cuts[i]]))
        size = len(rows)
        blocks.append(rows)
        if size == 1:
            vectors.append(None)
            continue
        v, q = reflection(size)
        vectors.append(v)
        lam1, lam2 = ranges[rows[0]], ranges[rows[1]]    # small rows are in descending order
        scales[rows[0]] = (lam1 / np.sqrt(size)) ** (-1 / 3)
        scales[rows[1:]] = (lam2 * q / (size - 1)) ** (-1 / 3) if lam2 > 0 else scales[rows[0]]
    return BlockHouseholder(tuple(blocks), tuple(vectors), scales, ranges)
