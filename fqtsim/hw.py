"""Hardware descriptions: YAML in, a typed, immutable, validated `HWConfig` out.

Loading is read -> validate against the dataclasses below -> build frozen objects. The dataclasses
are the schema: each field's type and its `check` metadata say what a YAML value may be, so a bad
file gets one `ValueError` naming the file, the key path and what is allowed.

Units: sizes in KiB, bandwidths in bytes per cycle, energies in pJ, clock in MHz.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def _check(test, allowed):
    return field(metadata={"test": test, "allowed": allowed})


def _positive(allowed="a finite number > 0"):
    return _check(lambda v: 0 < v < math.inf, allowed)


def _non_negative():
    return _check(lambda v: 0 <= v < math.inf, "a finite number >= 0")


def _int_range(lo, hi):
    return _check(lambda v: lo <= v <= hi, f"an integer in {lo}..{hi}")


@dataclass(frozen=True)
class Array:
    """The MAC array: `rows x cols` MACs, output stationary (each MAC owns one output element)."""
    rows: int = _positive("an integer > 0")
    cols: int = _positive("an integer > 0")
    operand_bits: int = _int_range(2, 8)  # widest operand code the MACs take; narrower codes run too
    clock_mhz: float = _positive()   # turns cycles into time


@dataclass(frozen=True)
class Accumulator:
    """Two's-complement accumulator; optional spills into a wider partial sum held in TCM."""
    bits: int = _int_range(8, 64)
    overflow: str = _check(lambda v: v in ("wrap", "saturate"), "'wrap' or 'saturate'")
    spill_every: int | None = _check(lambda v: v is None or v >= 1, "null or an integer >= 1")
    psum_bits: int = _int_range(8, 64)


@dataclass(frozen=True)
class TCM:
    """On-chip scratchpad: operand tiles, partial sums and (when they fit) wide outputs."""
    size_kib: float = _positive()
    read_bytes_per_cycle: float = _positive()
    write_bytes_per_cycle: float = _positive()
    read_pj_per_byte: float = _non_negative()
    write_pj_per_byte: float = _non_negative()

    @property
    def size_bytes(self) -> int:
        return int(self.size_kib * 1024)


@dataclass(frozen=True)
class DDR:
    """Off-chip DRAM, where tensors live between layers."""
    bytes_per_cycle: float = _positive()
    read_pj_per_byte: float = _non_negative()
    write_pj_per_byte: float = _non_negative()


@dataclass(frozen=True)
class VectorOp:
    """One vector-unit operation: energy per element, cycles per instruction of `lanes` elements."""
    pj: float = _non_negative()
    cycles: float = _positive()


@dataclass(frozen=True)
class Vector:
    """The vector unit beside the array: range reductions, sorting, RNG, requantization."""
    lanes: int = _positive("an integer > 0")
    minmax: VectorOp
    add: VectorOp
    mul: VectorOp
    compare: VectorOp
    rng: VectorOp
    requant: VectorOp


@dataclass(frozen=True)
class MacEnergy:
    """MAC energy: a multiplier scaled by operand widths plus an adder scaled by accumulator width."""
    mult_8x8_pj: float = _non_negative()
    add_32_pj: float = _non_negative()

    def mac_pj(self, a_bits: int, b_bits: int, acc_bits: int) -> float:
        # An array multiplier's energy grows with the product of its operand widths, a ripple or
        # prefix adder's with its width (the scaling behind Horowitz's 8- vs 32-bit figures).
        return self.mult_8x8_pj * (a_bits * b_bits) / 64 + self.add_pj(acc_bits)

    def add_pj(self, bits: int) -> float:
        return self.add_32_pj * bits / 32


@dataclass(frozen=True)
class Mapping:
    """Loop nest: two tiled output loops (outer first), the K loop innermost; tiles null = derived."""
    loop_order: tuple = _check(lambda v: tuple(v) in (("n", "m"), ("m", "n")), "[n, m] or [m, n]")
    tile_m: int | None = _check(lambda v: v is None or v >= 1, "null or an integer >= 1")
    tile_n: int | None = _check(lambda v: v is None or v >= 1, "null or an integer >= 1")
    tile_k: int | None = _check(lambda v: v is None or v >= 1, "null or an integer >= 1")
    double_buffer: bool


@dataclass(frozen=True)
class HWConfig:
    """A whole device: array, accumulator, memories, vector unit, energy table and mapping."""
    name: str = _check(lambda v: len(v) > 0, "a non-empty string")
    array: Array
    accumulator: Accumulator
    tcm: TCM
    ddr: DDR
    vector: Vector
    energy: MacEnergy
    mapping: Mapping
    description: str = ""


def load_hw(path: str | Path) -> HWConfig:
    """Read, validate and build a hardware config; any problem raises one ValueError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read the hardware config ({e.strerror}); "
                         f"give a path to a YAML file such as hw_configs/npu.yaml") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        hw = _build(HWConfig, raw, "")
        _check_consistency(hw)
    except _SchemaError as e:
        raise ValueError(f"{path}: {e}") from None
    return hw


class _SchemaError(Exception):
    pass


def _build(cls, raw, path):
    """Build dataclass `cls` from mapping `raw`, checking keys, types and ranges."""
    where = path or "top level"
    if not isinstance(raw, dict):
        raise _SchemaError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise _SchemaError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in raw:
            if f.default is not dataclasses.MISSING:
                continue
            raise _SchemaError(f"{key}: missing; expected {_describe(hints[name], f)}")
        values[name] = _convert(hints[name], raw[name], key, f)
    return cls(**values)


def _convert(hint, value, key, f):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    base = next(t for t in options if t is not type(None))
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, list),
    }[base]
    if not ok:
        raise _SchemaError(f"{key}: got {value!r} ({type(value).__name__}); "
                           f"expected {_describe(hint, f)}")
    value = tuple(value) if base is tuple else base(value)
    if not f.metadata.get("test", lambda v: True)(value):
        raise _SchemaError(f"{key}: got {value!r}; expected {_describe(hint, f)}")
    return value


def _describe(hint, f):
    if dataclasses.is_dataclass(hint):
        return "a mapping with keys " + ", ".join(x.name for x in dataclasses.fields(hint))
    allowed = f.metadata.get("allowed")
    if allowed:
        return allowed
    return {bool: "true or false", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _check_consistency(hw: HWConfig):
    acc = hw.accumulator
    if acc.spill_every is not None and acc.psum_bits < acc.bits:
        raise _SchemaError(f"accumulator.psum_bits: got {acc.psum_bits}, narrower than "
                           f"accumulator.bits = {acc.bits}; spills need psum_bits >= bits")
