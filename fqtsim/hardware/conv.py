"""Convolution operands built on chip: which input elements a tile of an im2col matrix needs.

A convolution's GEMM operand is its im2col matrix: one row per output position (sample-major,
then output rows, then columns), one column per (input channel, kernel row, kernel column),
channel-major as `torch.nn.functional.unfold` orders them. The matrix is never in DDR: the
loader fetches the feature map's elements a tile's windows cover (padding is not loaded) and the
address generator expands them into im2col rows as the array reads them. So loading a tile of
rows [r0, r1) and columns [c0, c1) moves

    pixels(r0, r1) x channels(c0, c1)

elements: the distinct input pixels under the kernel windows of those output positions (a
3x3, stride-1 band of t output rows needs t + 2 input rows, not 9t), times the input channels
those columns touch, each with its whole window (a K tile that splits a channel's kernel taps
loads that channel's window once for each tile it touches). The same matrix is the weight
gradient's B operand, rows = positions along its reduction.

Closed form here, vectorized over tiles; `fqtsim.simulation.device` counts the same elements by listing
them, and the tests hold the two equal.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from fqtsim.hardware.mapping import as_int
from kernels.conv import pixels_of


@dataclass(frozen=True)
class Im2col:
    """The im2col matrix of a 2-D convolution over `samples` feature maps of `channels` x
    `in_h` x `in_w`, with a `kernel` (kh, kw), `stride` (sh, sw) and zero `padding` (ph, pw)."""
    samples: int
    channels: int
    in_h: int
    in_w: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)

    def __post_init__(self):
        for name in ("samples", "channels", "in_h", "in_w"):
            value = getattr(self, name)
            if as_int(value) is None or value < 1:
                raise ValueError(f"{name}: got {value!r}; expected an integer >= 1")
            object.__setattr__(self, name, int(value))
        for name, least in (("kernel", 1), ("stride", 1), ("padding", 0)):
            value = getattr(self, name)
            pair = (value, value) if as_int(value) is not None else tuple(value)
            if len(pair) != 2 or any(as_int(v) is None or v < least for v in pair):
                raise ValueError(f"{name}: got {value!r}; expected an integer >= {least} or a "
                                 f"pair of them")
            object.__setattr__(self, name, tuple(int(v) for v in pair))
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(f"kernel {self.kernel} with padding {self.padding} does not fit the "
                             f"{self.in_h}x{self.in_w} input: no output positions")

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1

    @property
    def positions(self) -> int:
        """Output positions per sample: the im2col rows of one sample."""
        return self.out_h * self.out_w

    @property
    def rows(self) -> int:
        return self.samples * self.positions

    @property
    def taps(self) -> int:
        """Kernel taps per channel: the im2col columns of one channel."""
        return self.kernel[0] * self.kernel[1]

    @property
    def cols(self) -> int:
        return self.channels * self.taps

    def axis(self, i: int) -> "_Axis":
        return _Axis(self.out_h if i == 0 else self.out_w, self.in_h if i == 0 else self.in_w,
                     self.stride[i], self.padding[i], self.kernel[i])

    def pixels(self, r0, r1) -> np.ndarray:
        """Distinct input pixels (per channel) under the windows of im2col rows [r0, r1)."""
        return _pixels(self, np.asarray(r0, dtype=np.int64), np.asarray(r1, dtype=np.int64))

    def channels_of(self, c0, c1) -> np.ndarray:
        """Input channels touched by im2col columns [c0, c1)."""
        c0, c1 = np.asarray(c0, dtype=np.int64), np.asarray(c1, dtype=np.int64)
        return (c1 - 1) // self.taps - c0 // self.taps + 1

    def new_channels(self, c0, c1) -> np.ndarray:
        """Channels whose first column lies in [c0, c1): those a walk over columns in order
        meets first there."""
        t = self.taps
        c0, c1 = np.asarray(c0, dtype=np.int64), np.asarray(c1, dtype=np.int64)
        return -(-c1 // t) - -(-c0 // t)

    def row_tiles(self, tile: int) -> "Tiles":
        return row_tiles(self, tile)

    def col_tiles(self, tile: int) -> "Tiles":
        return col_tiles(self, tile)

    @functools.cached_property
    def elements(self) -> int:
        """Input elements the whole matrix covers (all samples and channels; padding and
        pixels no window reaches are not counted)."""
        return int(self.pixels(0, self.rows)) * self.channels


@dataclass(frozen=True)
class _Axis:
    """One spatial axis: output o covers inputs o*stride - pad + [0, taps), clipped to [0, size)."""
    out: int
    size: int
    stride: int
    pad: int
    taps: int


@functools.lru_cache(maxsize=256)
def _disjoint_prefix(axis: _Axis) -> np.ndarray:
    """Prefix sums of each output's clipped window length (windows that do not overlap)."""
    return np.concatenate([[0], np.cumsum(_window_lengths(axis))])


def _window_lengths(axis: _Axis) -> np.ndarray:
    """Each output's window length inside the map (padding cut off)."""
    start = np.arange(axis.out) * axis.stride - axis.pad
    return np.maximum(np.minimum(start + axis.taps, axis.size) - np.maximum(start, 0), 0)


def _pixels(geom: Im2col, r0, r1):
    """`Im2col.pixels` over arrays (or scalars) of row bounds."""
    r0, r1 = np.broadcast_arrays(r0, r1)
    axes = [geom.axis(i) for i in (0, 1)]
    args = [v for ax in axes for v in ((ax.out, ax.size, ax.stride, ax.pad, ax.taps),
                                       _disjoint_prefix(ax))]
    counts = pixels_of(*args, geom.out_w, geom.positions, r0.ravel(), r1.ravel())
    return counts.reshape(r0.shape) if r0.ndim else counts[0]


@dataclass(frozen=True)
class Tiles:
    """The tiles of one operand dimension, as classes of identical tiles: each class's tile
    size, how many tiles it has (class 0 holds the first tile), the elements one tile covers
    (pixels or channels) and the elements it adds to those of the tiles before it."""
    size: np.ndarray
    count: np.ndarray
    each: np.ndarray
    new: np.ndarray

    @functools.cached_property
    def total(self) -> int:
        """Elements all tiles cover, one tile at a time."""
        return int((self.count * self.each).sum())


@functools.lru_cache(maxsize=4096)
def row_tiles(geom: Im2col, tile: int) -> Tiles:
    """The tiles of `tile` consecutive rows (the last may be shorter): their pixels, and the
    pixels each adds to those before it (what a buffer holding the whole operand loads on the
    tile's first use). Tiles repeat with the samples: one period of them is computed."""
    count = -(-geom.rows // tile)
    period = min(geom.positions // math.gcd(tile, geom.positions), count - 1)
    starts = np.append(np.arange(period, dtype=np.int64) * tile, (count - 1) * tile)
    ends = np.minimum(starts + tile, geom.rows)
    reps = np.arange(period)
    counts = np.append((count - 1 - reps + period - 1) // max(period, 1), 1)
    upto = lambda r: geom.pixels(np.zeros_like(r), r)   # noqa: E731: pixels of rows [0, r)
    return _frozen(Tiles(ends - starts, counts, geom.pixels(starts, ends), upto(ends) - upto(starts)))


@functools.lru_cache(maxsize=4096)
def col_tiles(geom: Im2col, tile: int) -> Tiles:
    """The tiles of `tile` consecutive columns: the channels each touches, and the channels each
    meets first."""
    starts = np.arange(0, geom.cols, tile, dtype=np.int64)
    ends = np.minimum(starts + tile, geom.cols)
    return _frozen(Tiles(ends - starts, np.ones_like(starts), geom.channels_of(starts, ends),
                         geom.new_channels(starts, ends)))


def _frozen(tiles: Tiles) -> Tiles:
    for array in (tiles.size, tiles.count, tiles.each, tiles.new):
        array.setflags(write=False)
    return tiles


def col2im(geom: Im2col) -> tuple[int, int]:
    """(im2col entries that land on input elements, input elements they land on): folding a
    gradient's im2col matrix back onto its feature map adds the first minus the second."""
    per_axis = []   # (output, tap) pairs whose input lies inside the map, per axis
    for ax in (geom.axis(0), geom.axis(1)):
        per_axis.append(int(_window_lengths(ax).sum()))
    entries = per_axis[0] * per_axis[1] * geom.channels * geom.samples
    return entries, geom.elements
