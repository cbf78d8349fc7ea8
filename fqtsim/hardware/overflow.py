"""Worst-case accumulator magnitudes: whether a config can overflow for given operand codes.

The MAC array adds products of codes in its accumulator for `accumulator.spill_every` MACs (or the
whole K when it does not spill), then adds that run into a partial sum of `psum_bits`. Both stay
exact only if no sum they can hold leaves their two's-complement range. The bound here is the
worst case over codes: every product at its extreme, all of one sign. A config whose run bound
overflows the accumulator overflows by construction on any GEMM with K at or above the spill
period, whatever the data; one whose bound over K overflows can on GEMMs that long.

Codes as fqtsim makes them (`fqtsim.quantizers`): weights are symmetric signed codes
(-(2^(b-1)-1)..2^(b-1)-1); activations and gradients are affine codes, unsigned (0..2^b-1) for a
group with no negative value, else centred signed (-2^(b-1)..2^(b-1)-1), so either may occur.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CODE_KINDS = ("unsigned", "signed", "symmetric", "affine")


def code_range(bits: int, kind: str) -> tuple[int, int]:
    """(lowest, highest) code of `bits`-bit codes of `kind`: unsigned, signed (two's
    complement), symmetric (signed without -2^(b-1): weights) or affine (an activation or
    gradient group: unsigned or signed, whichever its data makes)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(f"bits: got {bits!r}; expected an integer in 1..32")
    half = 1 << (bits - 1)
    ranges = {"unsigned": (0, 2 * half - 1), "signed": (-half, half - 1),
              "symmetric": (-(half - 1), half - 1), "affine": (-half, 2 * half - 1)}
    if kind not in ranges:
        raise ValueError(f"kind: got {kind!r}; expected one of {', '.join(CODE_KINDS)}")
    return ranges[kind]


def bits_needed(lo: int, hi: int) -> int:
    """Width of the narrowest two's-complement register holding every integer in lo..hi."""
    bits = 1
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


@dataclass(frozen=True)
class Bound:
    """The worst case of one GEMM shape on one accumulator: sums as (lowest, highest)."""
    k: int                  # products per output
    run: int                # products the accumulator sums before it spills (K without spills)
    product: tuple          # extremes of one product of codes
    accumulator: tuple      # extremes of a run's sum
    acc_bits: int
    total: tuple            # extremes of the whole K's sum, held by the partial sum
    psum_bits: int | None   # None: no spills, the accumulator holds the whole K

    @property
    def acc_overflows(self) -> bool:
        return bits_needed(*self.accumulator) > self.acc_bits

    @property
    def psum_overflows(self) -> bool:
        return self.psum_bits is not None and bits_needed(*self.total) > self.psum_bits

    @property
    def can_overflow(self) -> bool:
        return self.acc_overflows or self.psum_overflows

    @property
    def k_max(self) -> int:
        """The longest K whose worst case fits."""
        acc_k = _longest(self.product, self.acc_bits)
        if self.psum_bits is None or acc_k < self.run:
            return acc_k
        return _longest(self.product, self.psum_bits)

    def describe(self) -> str:
        text = (f"worst case {_magnitude(self.accumulator)} over {self.run:,} products in the "
                f"{self.acc_bits}-bit accumulator")
        if self.psum_bits is not None:
            text += (f", {_magnitude(self.total)} over K = {self.k:,} in the {self.psum_bits}-bit "
                     f"partial sum")
        return text


def _longest(product: tuple, bits: int) -> int:
    """How many products of `product`'s extremes a `bits`-wide register sums without leaving
    its range."""
    limits = []
    if product[1] > 0:
        limits.append(((1 << (bits - 1)) - 1) // product[1])
    if product[0] < 0:
        limits.append((1 << (bits - 1)) // -product[0])
    return min(limits) if limits else (1 << 62)


def _magnitude(extremes: tuple) -> str:
    peak = max(-extremes[0], extremes[1])
    return f"{peak:,} (2^{math.log2(peak):.1f}, {bits_needed(*extremes)} bits)" if peak else "0"


def accumulator_bound(acc_bits: int, spill_every: int | None, psum_bits: int, k: int,
                      a_range: tuple[int, int], b_range: tuple[int, int]) -> Bound:
    """The worst case of a K-long dot product of codes in `a_range` by codes in `b_range` on an
    accumulator of `acc_bits` that spills every `spill_every` MACs (None: never) into a partial
    sum of `psum_bits`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: got {k!r}; expected an integer >= 1")
    corners = [a * b for a in a_range for b in b_range]
    product = (min(corners), max(corners))
    run = k if spill_every is None else min(spill_every, k)
    return Bound(k, run, product, (run * min(product[0], 0), run * max(product[1], 0)), acc_bits,
                 (k * min(product[0], 0), k * max(product[1], 0)),
                 None if spill_every is None else psum_bits)


def gemm_bound(hw, k: int, a_bits: int = 8, b_bits: int = 8, a_kind: str = "affine",
               b_kind: str = "symmetric") -> Bound:
    """The worst case of a GEMM with K = `k` on `hw` (an HWConfig), with A's codes of `a_bits` of
    `a_kind` and B's of `b_bits` of `b_kind` (defaults: a gradient or activation by weights)."""
    acc = hw.accumulator
    return accumulator_bound(acc.bits, acc.spill_every, acc.psum_bits, k,
                             code_range(a_bits, a_kind), code_range(b_bits, b_kind))


# The GEMMs of an FQT training step: (name, A's codes, B's codes, what K is), as
# fqtsim.training.fqt runs them (forward codes and weight-gradient codes are 8-bit)
FQT_GEMMS = (("output", "activation", "weight", "the layer's inputs (k)"),
             ("grad_input", "gradient", "weight", "the layer's outputs (n)"),
             ("grad_weight", "gradient", "activation", "the samples of a batch (batch x rows)"))


def training_bounds(hw, layers, batch: int, grad_bits: int = 8) -> list[tuple[str, Bound]]:
    """The worst case of each kind of GEMM of an FQT training step of `layers` (objects with k, n
    and rows, e.g. fqtsim.simulation.workloads.Layer, whose `kind` and `per_sample` are heeded
    where they have them: an embedding runs no GEMM, a per-sample GEMM sums one sample's rows)
    at `batch` samples on `hw`, at the longest K of that kind: [(gemm name, Bound)]."""
    forward_bits = weight_grad_bits = 8
    layers = [layer for layer in layers if getattr(layer, "kind", "gemm") == "gemm"]
    out = []
    for name, a, b, _ in FQT_GEMMS:
        if name == "output":
            k, a_bits = max(layer.k for layer in layers), forward_bits
        elif name == "grad_input":
            k, a_bits = max(layer.n for layer in layers), grad_bits
        else:
            k, a_bits = max(layer.rows * (1 if getattr(layer, "per_sample", False) else batch)
                            for layer in layers), weight_grad_bits
        out.append((name, gemm_bound(hw, k, a_bits, 8, "affine",
                                     "symmetric" if b == "weight" else "affine")))
    return out


def summary(hw, bounds: list[tuple[str, Bound]]) -> tuple[str, list[str]]:
    """A line stating `hw`'s accumulator and the worst cases of `bounds`, and warnings for
    those that can overflow."""
    acc = hw.accumulator
    spill = (f", spilling every {acc.spill_every} MACs into {acc.psum_bits}-bit partial sums"
             if acc.spill_every is not None else "")
    line = f"{hw.name}: {acc.bits}-bit {acc.overflow} accumulators{spill}"
    warnings, broken = [], []
    for name, bound in bounds:
        line += f"\n  {name}: {bound.describe()}"
        if bound.acc_overflows and bound.run == acc.spill_every:
            broken.append(f"{name} ({bits_needed(*bound.accumulator)} bits)")
        elif bound.can_overflow:
            where = "partial sums" if not bound.acc_overflows else "accumulators"
            warnings.append(f"{hw.name} can overflow its {where} on {name}: K = {bound.k:,} "
                            f"exceeds the {bound.k_max:,} products whose worst case fits")
    if broken:
        warnings.insert(0, f"{hw.name} overflows by construction: {acc.spill_every} products of "
                           f"these codes need more than its {acc.bits}-bit accumulators hold "
                           f"before each spill ({', '.join(broken)}); results go wrong whenever "
                           f"the data comes near the worst case, and its costs describe a "
                           f"broken configuration")
    return line, warnings
