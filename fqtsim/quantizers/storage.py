"""Stored formats of the optimizer's persistent state: how the device keeps the weights and the
momentum between steps, and how each write rounds. The numerics here (what a run trains with)
and the update's events (`fqtsim.simulation.schedule.update_events`: bytes, vector ops, random
numbers) read the same `Format`s.

Weights (`WEIGHT_FORMATS`):
    fp32        FP32 masters: the baseline
    bf16-sr     bf16, stochastically rounded on every write
    bf16-rn     bf16, to nearest (ties to even): an update under half an ulp of its weight is lost
    bf16-kahan  bf16, to nearest, with a second bf16 buffer that keeps what each write lost and
                adds it back into the next update (Kahan summation)
    int16-sr    int16 fixed point with 14 fractional bits (range +-2, step 2^-14), saturating;
                stochastic rounding
    int8-sr     int8 symmetric codes with one power-of-two scale per output channel (a row of
                the weight; a 1-D parameter is one row): block floating point, its exponent
                the smallest that holds the row's peak at each write; stochastic. No master
                copy: the forward GEMM reads these codes as they are
    int8-rn     the same, to nearest
Momentum (`MOMENTUM_FORMATS`): fp32; bf16, to nearest; int8, symmetric codes in blocks of
`block` consecutive values (a 1-D parameter's momentum is one block), a power-of-two scale per
block, stochastic (to nearest, a small value in a block with a large one would round to 0 every
step).

Stochastic rounding moves x to the upper of its two grid neighbours when u < p, p its distance
from the lower one in grid steps and u one uniform number in [0, 1) per value (`rng.random` over
the tensor in C order): E[stored] = x. A scale is an 8-bit exponent (as SWALP's block floating
point and the OCP MX formats store theirs): it changes only when a peak crosses a power of two,
and a code times its scale is exact in fp32, so the fp32 values the update and the forward pass
compute with are exactly the stored ones. Initial weights are written once, to nearest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fqtsim.quantizers.affine import NonFiniteError

SCALE_BYTES = 1          # an 8-bit exponent per row or block
FIXED_FRACTION = 14      # int16 fixed point: Q2.14


@dataclass(frozen=True)
class Format:
    """One stored format: its width, its rounding and what its scales cover."""
    name: str
    bits: int                   # per stored value (a Kahan pair: per buffer)
    integer: bool = False       # symmetric integer codes times scales; else fp32 or bf16
    stochastic: bool = False    # stochastic rounding on every write: a random number per value
    compensated: bool = False   # Kahan: a second buffer of the same width
    scales: str | None = None   # integer codes: "row" or "block" (a power-of-two scale each, set
                                # from the group's peak at every write) or "fixed" (2^-14)

    @property
    def buffers(self) -> int:
        """Stored buffers per value: two for a Kahan pair."""
        return 2 if self.compensated else 1

    @property
    def value_bytes(self) -> int:
        """Bytes per value, every buffer."""
        return self.bits // 8 * self.buffers

    @property
    def peaked(self) -> bool:
        """Whether each write finds its groups' peaks first (to set their scales)."""
        return self.scales in ("row", "block")

    def scale_count(self, values: int, rows: int | None, block: int) -> int:
        """Scales kept by a tensor of `values` values in `rows` rows (None: a 1-D tensor, one row
        and one block)."""
        if self.scales == "row":
            return rows or 1
        if self.scales == "block":
            return 1 if rows is None else values // block
        return 0

    def nbytes(self, values: int, rows: int | None = None, block: int = 1,
               compensation: bool = True) -> int:
        """Bytes of a tensor of `values` values in `rows` rows (None: 1-D) stored in this format;
        `compensation`: with Kahan's second buffer (what the update reads, not the GEMMs)."""
        width = self.value_bytes if compensation else self.bits // 8
        return values * width + self.scale_count(values, rows, block) * SCALE_BYTES


WEIGHT_FORMATS = {f.name: f for f in (
    Format("fp32", 32), Format("bf16-sr", 16, stochastic=True), Format("bf16-rn", 16),
    Format("bf16-kahan", 16, compensated=True),
    Format("int16-sr", 16, integer=True, stochastic=True, scales="fixed"),
    Format("int8-sr", 8, integer=True, stochastic=True, scales="row"),
    Format("int8-rn", 8, integer=True, scales="row"))}
MOMENTUM_FORMATS = {f.name: f for f in (
    Format("fp32", 32), Format("bf16", 16),
    Format("int8", 8, integer=True, stochastic=True, scales="block"))}
DEFAULT_BLOCK = 16   # divides every weight count of the MLP, the CNN, ResNet-50 and the transformer


@dataclass(frozen=True)
class StateFormats:
    """The formats of a run's persistent state (`state_formats` builds one from names)."""
    weights: Format = WEIGHT_FORMATS["fp32"]
    momentum: Format = MOMENTUM_FORMATS["fp32"]
    block: int = DEFAULT_BLOCK   # momentum values per scale, where the momentum is blocked

    @property
    def masters(self) -> bool:
        """FP32 weights and momentum: today's update, torch.optim.SGD's arithmetic."""
        return self.weights.name == "fp32" and self.momentum.name == "fp32"

    @property
    def stochastic(self) -> bool:
        return self.weights.stochastic or self.momentum.stochastic

    def names(self) -> dict:
        """As `state_formats`' arguments (and `training_step`'s, `RunConfig`'s fields)."""
        return {"weights": self.weights.name, "momentum": self.momentum.name,
                "momentum_block": self.block}


def state_formats(weights: str = "fp32", momentum: str = "fp32",
                  momentum_block: int = DEFAULT_BLOCK) -> StateFormats:
    """The `StateFormats` named; an unknown name or a block that is not an integer >= 1 is a
    ValueError naming what is allowed."""
    for what, name, allowed in (("weights", weights, WEIGHT_FORMATS),
                                ("momentum", momentum, MOMENTUM_FORMATS)):
        if not isinstance(name, str) or name not in allowed:
            raise ValueError(f"{what}: got {name!r}; expected one of {', '.join(allowed)}")
    block = momentum_block
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"momentum block: got {block!r}; expected an integer >= 1")
    return StateFormats(WEIGHT_FORMATS[weights], MOMENTUM_FORMATS[momentum], int(block))


FP32_STATE = StateFormats()


def check_blocks(sizes: dict, formats: StateFormats, what: str = "layer") -> None:
    """Refuse a momentum block that does not divide every weight tensor's value count (`sizes`:
    name -> count), naming the first that it does not and a block that divides them all."""
    if formats.momentum.scales != "block":
        return
    block = formats.block
    for name, size in sizes.items():
        if size % block:
            common = math.gcd(*sizes.values())
            fits = next(d for d in range(min(block, common), 0, -1) if common % d == 0)
            raise ValueError(f"momentum block {block}: {what} {name}'s weights ({size:,} values) "
                             f"are not a whole number of blocks of {block}; pick a block that "
                             f"divides every {what}'s weight count, e.g. {fits}")


@dataclass(frozen=True)
class Stored:
    """A tensor as the device stores it. `codes`: fp32 or bf16 values as fp32 (the values
    themselves), or int8/int16 codes, grouped in rows of one scale each (int8) or flat (int16);
    `scale`: per group (powers of two as fp32, shape (groups, 1)) or the fixed one;
    `compensation`: bf16-kahan's second buffer; `shape`: the tensor's."""
    codes: np.ndarray
    shape: tuple
    scale: np.ndarray | float = 1.0
    compensation: np.ndarray | None = None

    def values(self) -> np.ndarray:
        """The fp32 values the device computes with, in the tensor's shape (exact)."""
        if self.codes.dtype == np.float32:
            return self.codes.reshape(self.shape)
        return (self.codes.astype(np.float32) * np.float32(self.scale)
                if np.isscalar(self.scale) else
                self.codes.astype(np.float32) * self.scale).reshape(self.shape)


def store(fmt: Format, x: np.ndarray, rng: np.random.Generator | None = None,
          block: int = DEFAULT_BLOCK) -> Stored:
    """fp32 values `x` written in `fmt`: stochastically with `rng` where the format rounds so,
    else (and with rng None: a first write) to nearest. `block`: values per scale of a blocked
    format."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    shape = x.shape
    if fmt.name == "fp32":
        return Stored(x.copy(), shape)
    u = None
    if fmt.stochastic and rng is not None:
        u = rng.random(x.size).reshape(shape)
    if not fmt.integer:
        return Stored(round_bf16(x, u), shape)
    if not np.isfinite(x).all():
        raise NonFiniteError(f"{fmt.name}: {np.count_nonzero(~np.isfinite(x))} NaN or Inf values "
                             f"to store; the training diverged, lower the learning rate")
    if fmt.scales == "fixed":
        top = (1 << (fmt.bits - 1)) - 1
        step = 2.0 ** -FIXED_FRACTION
        codes = np.clip(_round(x.astype(np.float64) / step, u), -top, top)
        return Stored(codes.astype(np.int16), shape, step)
    rows = _grouped(fmt, x, block)
    u = None if u is None else u.reshape(rows.shape)
    scale = power_scale(np.abs(rows).max(axis=1, keepdims=True).astype(np.float64), 127)
    codes = np.clip(_round(rows.astype(np.float64) / scale, u), -127, 127)
    return Stored(codes.astype(np.int8), shape, scale.astype(np.float32))


def add(fmt: Format, stored: Stored, update: np.ndarray,
        rng: np.random.Generator | None) -> Stored:
    """The weights `stored` plus fp32 `update`, written back in `fmt` (fp32 adds, each rounded:
    the vector unit's). bf16-kahan: y = update - c, s = w + y to bf16, c = (s - w) - y to bf16."""
    w = stored.values()
    update = np.asarray(update, dtype=np.float32).reshape(stored.shape)
    if not fmt.compensated:
        return store(fmt, w + update, rng)
    y = update - stored.compensation.reshape(stored.shape)
    s = round_bf16(w + y)
    return Stored(s, stored.shape, compensation=round_bf16((s - w) - y))


def first(fmt: Format, x: np.ndarray) -> Stored:
    """Initial weights written in `fmt`, to nearest; bf16-kahan keeps what that lost."""
    stored = store(fmt, x)
    if not fmt.compensated:
        return stored
    x = np.ascontiguousarray(x, dtype=np.float32)
    return Stored(stored.codes, stored.shape, compensation=round_bf16(stored.codes - x))


def round_bf16(x: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """fp32 `x` rounded to bf16 (returned as fp32): to nearest, ties to even; or, with uniforms
    `u` of x's shape, up (away from zero) when u < the 16 dropped bits / 2^16. NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    low = bits & 0xFFFF
    if u is None:
        up = (low > 0x8000) | ((low == 0x8000) & ((bits >> 16) & 1 == 1))
    else:
        up = np.asarray(u) * 65536.0 < low
    out = ((bits - low) + (up.astype(np.uint64) << 16)).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out)


def power_scale(peak: np.ndarray, top: int) -> np.ndarray:
    """The smallest powers of two s with peak <= top * s (1 where the peak is 0)."""
    _, e = np.frexp(peak / top)
    s = np.ldexp(1.0, e - 1)
    s = np.where(top * s < peak, 2 * s, s)   # 2^(e-1) holds it only where peak / top is a power
    return np.where(peak > 0, s, 1.0)


def _round(y: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """Grid units `y` to integers: to nearest (ties to even), or up when u < y - floor(y)."""
    if u is None:
        return np.rint(y)
    lower = np.floor(y)
    return lower + (u < y - lower)


def _grouped(fmt: Format, x: np.ndarray, block: int) -> np.ndarray:
    """`x` as rows of one scale each: per output channel (row), or blocks of `block`."""
    if x.ndim < 2:
        return x.reshape(1, -1)
    if fmt.scales == "row":
        return x.reshape(x.shape[0], -1)
    if x.size % block:
        raise ValueError(f"momentum block {block}: a tensor of {x.size:,} values is not a whole "
                         f"number of blocks; pick a block that divides it")
    return x.reshape(-1, block)
