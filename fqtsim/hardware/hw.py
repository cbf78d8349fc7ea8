"""Hardware descriptions: YAML in, a typed, immutable, validated `HWConfig` out.

Loading is read -> validate against the dataclasses below -> build frozen objects. The dataclasses
are the schema: each field's type and its `check` metadata say what a YAML value may be, so a bad
file gets one `ValueError` naming the file, the key path and what is allowed.

Units: sizes in KiB, bandwidths in bytes per cycle, energies in pJ, clock in MHz. Every figure
also has an upper bound (e.g. at most 1e6 pJ per byte or op), so that no cost computed from a
config can overflow to inf. A YAML key given twice is refused (plain YAML keeps the last), and so
is a file that is not UTF-8 text.

Energy figures may be left null: `derive` fills them from the table of the config's `technology`
(`fqtsim.hardware.energy`) and records which in `HWConfig.derived`; static power left null is
fqtsim's leakage estimate. Fields marked "derived" in their metadata are filled in, not read.

`load_hw` also takes the name of a shipped config (`npu`, `npu-acc24.yaml`), and a relative
`hw_configs/NAME.yaml` that does not exist in the current directory is the shipped one: the
default `--hw` works from any directory (`resolve_hw`, `shipped_dir`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fqtsim.hardware import energy


OBJECTIVES = ("energy", "cycles", "edp")
LOOP_ORDERS = (("n", "m"), ("m", "n"), *itertools.permutations("mnk"))


def _check(test, allowed):
    return field(metadata={"test": test, "allowed": allowed})


# Upper bounds: generous for any real device, small enough that no product of figures and event
# counts (up to ~1e15 bytes or ops per step) leaves float64's range or turns to inf.
MAX_PJ = 1e6            # pJ per byte or per op (1 uJ; DRAM is ~160 pJ per byte)
MAX_MW = 1e6            # static power (1 kW)
MAX_CYCLES = 1e6        # cycles per vector instruction
MAX_BANDWIDTH = 1e9     # bytes per cycle
MIN_BANDWIDTH = 1e-6
MAX_CLOCK_MHZ = 1e6
MAX_TCM_KIB = 1 << 30   # 1 TiB
MAX_UNITS = 1 << 16     # MAC rows, columns, vector lanes
MAX_TILE = (1 << 31) - 1


def _positive(allowed="a finite number > 0", hi=math.inf):
    return _check(lambda v: 0 < v < math.inf and v <= hi, allowed)


def _count(hi=MAX_UNITS):
    return _positive(f"an integer > 0, at most {hi}", hi)


def _non_negative():
    return _check(lambda v: 0 <= v <= MAX_PJ, f"a finite number >= 0, at most {MAX_PJ:g} (pJ)")


def _energy():
    """An energy figure, or null: the config's technology table gives it (see `derive`)."""
    return _check(lambda v: v is None or 0 <= v <= MAX_PJ,
                  f"a finite number >= 0, at most {MAX_PJ:g} (pJ), or null (from the table of "
                  f"the config's technology: {', '.join(energy.TECHNOLOGIES)})")


def _derived():
    """A field load_hw fills in, not a YAML key."""
    return field(default=None, metadata={"derived": True})


def _bandwidth():
    return _check(lambda v: MIN_BANDWIDTH <= v <= MAX_BANDWIDTH,
                  f"a finite number > 0 (bytes per cycle, from {MIN_BANDWIDTH:g} to "
                  f"{MAX_BANDWIDTH:g})")


def _int_range(lo, hi):
    return _check(lambda v: lo <= v <= hi, f"an integer in {lo}..{hi}")


def _optional_count(hi=MAX_TILE):
    return _check(lambda v: v is None or 1 <= v <= hi, f"null or an integer >= 1, at most {hi}")


@dataclass(frozen=True)
class Array:
    """The MAC array: `rows x cols` MACs, output stationary (each MAC owns one output element)."""
    rows: int = _count()
    cols: int = _count()
    operand_bits: int = _int_range(2, 8)  # widest operand code the MACs take; narrower codes run too
    clock_mhz: float = _positive(f"a finite number > 0, at most {MAX_CLOCK_MHZ:g} (MHz)",
                                 MAX_CLOCK_MHZ)   # turns cycles into time


@dataclass(frozen=True)
class Accumulator:
    """Two's-complement accumulator; optional spills into a wider partial sum held in TCM."""
    bits: int = _int_range(8, 64)
    overflow: str = _check(lambda v: v in ("wrap", "saturate"), "'wrap' or 'saturate'")
    spill_every: int | None = _optional_count()
    psum_bits: int = _int_range(8, 64)


@dataclass(frozen=True)
class Partitions:
    """TCM split into a buffer per operand (KiB each): A tiles, B tiles, and output tiles with
    their partial sums; what the three leave, and the output buffer's rest, hold wide outputs."""
    a_kib: float = _positive(f"a finite number > 0, at most {MAX_TCM_KIB} (KiB)", MAX_TCM_KIB)
    b_kib: float = _positive(f"a finite number > 0, at most {MAX_TCM_KIB} (KiB)", MAX_TCM_KIB)
    out_kib: float = _positive(f"a finite number > 0, at most {MAX_TCM_KIB} (KiB)", MAX_TCM_KIB)

    @property
    def sizes_bytes(self) -> tuple[int, int, int]:
        return int(self.a_kib * 1024), int(self.b_kib * 1024), int(self.out_kib * 1024)


@dataclass(frozen=True)
class TCM:
    """On-chip scratchpad: operand tiles, partial sums and (when they fit) wide outputs."""
    size_kib: float = _positive(f"a finite number > 0, at most {MAX_TCM_KIB} (KiB, 1 TiB)",
                                MAX_TCM_KIB)
    read_bytes_per_cycle: float = _bandwidth()
    write_bytes_per_cycle: float = _bandwidth()
    # null: the technology's SRAM curve at the TCM's capacity (a partitioned TCM: each buffer's)
    read_pj_per_byte: float | None = _energy()
    write_pj_per_byte: float | None = _energy()
    partitions: Partitions | None = None   # null: one pool shared by tiles and wide outputs
    # derived SRAM figures of a partitioned TCM: ((read, write) of A's buffer, of B's); the
    # output buffer and what the partitions leave have read/write_pj_per_byte
    operand_pj: tuple | None = _derived()

    @property
    def size_bytes(self) -> int:
        return int(self.size_kib * 1024)

    def pj_per_byte(self, direction: str, buffer: str = "out") -> float:
        """pJ per byte read or written at `buffer` ('a', 'b' or 'out')."""
        if self.operand_pj is not None and buffer in ("a", "b"):
            return self.operand_pj[buffer == "b"][direction == "write"]
        return self.read_pj_per_byte if direction == "read" else self.write_pj_per_byte


@dataclass(frozen=True)
class DDR:
    """Off-chip DRAM, where tensors live between layers."""
    bytes_per_cycle: float = _bandwidth()
    read_pj_per_byte: float | None = _energy()     # null: the technology's DRAM figure
    write_pj_per_byte: float | None = _energy()
    # which DRAM of the technology's table null figures take (null: its first, DDR-class)
    kind: str | None = field(default=None, metadata={"allowed": "null or a DRAM kind of the "
                                                     "technology's table (e.g. ddr, hbm2, gddr6)"})


@dataclass(frozen=True)
class VectorOp:
    """One vector-unit operation: energy per element, cycles per instruction of `lanes` elements."""
    pj: float | None = _energy()   # null: built from the technology's adds and multiplies
    cycles: float = _positive(f"a finite number > 0, at most {MAX_CYCLES:g}", MAX_CYCLES)


@dataclass(frozen=True)
class Vector:
    """The vector unit beside the array: range reductions, sorting, RNG, requantization."""
    lanes: int = _count()
    minmax: VectorOp
    add: VectorOp
    mul: VectorOp
    compare: VectorOp
    rng: VectorOp
    requant: VectorOp


@dataclass(frozen=True)
class MacEnergy:
    """MAC energy: a multiplier scaled by operand widths plus an adder scaled by accumulator
    width; and the chip's static power, charged over elapsed time."""
    mult_8x8_pj: float | None = _energy()   # null: the technology's 8-bit multiply
    add_32_pj: float | None = _energy()     # null: the technology's 32-bit add
    # leakage of the whole chip (mW), charged as power x elapsed cycles / clock; 0: none;
    # null: fqtsim's estimate, energy.LEAKAGE_SHARE of the chip's peak on-chip dynamic power
    static_mw: float | None = field(default=0.0, metadata={
        "test": lambda v: v is None or 0 <= v <= MAX_MW,
        "allowed": f"a finite number >= 0, at most {MAX_MW:g} (mW), or null (fqtsim's estimate: "
                   f"a share of the peak on-chip dynamic power)"})

    def mac_pj(self, a_bits: int, b_bits: int, acc_bits: int) -> float:
        # An array multiplier's energy grows with the product of its operand widths, a ripple or
        # prefix adder's with its width (the scaling behind Horowitz's 8- vs 32-bit figures).
        return self.mult_8x8_pj * (a_bits * b_bits) / 64 + self.add_pj(acc_bits)

    def add_pj(self, bits: int) -> float:
        return self.add_32_pj * bits / 32


@dataclass(frozen=True)
class Mapping:
    """Loop nest: two tiled output loops (outer first) and the K loop (innermost unless the order
    names it); tiles null = derived; the mapper's objective."""
    loop_order: tuple | None = _check(
        lambda v: v is None or tuple(v) in LOOP_ORDERS,
        "[n, m] or [m, n] (K innermost), an order of all three loops with k among them (e.g. "
        "[n, k, m]: the output tiles' partial sums wait between K tiles), or null (the planner "
        "picks per GEMM)")
    tile_m: int | None = _optional_count()
    tile_n: int | None = _optional_count()
    tile_k: int | None = _optional_count()
    double_buffer: bool
    # what the mapper minimizes where the YAML leaves tiles or loop order open: the GEMM's energy,
    # its cycles, or their product (edp), each with its quantizer's passes
    objective: str = field(default="cycles", metadata={
        "test": lambda v: v in OBJECTIVES, "allowed": "energy, cycles or edp"})


WIDE_FORMATS = ("accumulator", "fp32", "bf16")


def _choice(default, options, allowed):
    return field(default=default, metadata={"test": lambda v: v in options, "allowed": allowed})


@dataclass(frozen=True)
class Pipeline:
    """What the output pipeline does as a tile leaves the array, and how the vector unit runs;
    the section may be left out (these defaults are what a designer would build)."""
    # fused: min/max comparators track a tensor's ranges (per sample too) as its wide tiles are
    # written; pass: a separate read of the wide tensor finds them
    range: str = _choice("fused", ("fused", "pass"), "'fused' or 'pass'")
    # how a tensor written out at full width is stored: raw accumulator sums, or scaled to
    # fp32 or bf16 (its scales are known), which rounds what the next quantizer reads
    wide_format: str = _choice("accumulator", WIDE_FORMATS, "accumulator, fp32 or bf16")
    # BHQ's T^-1: gather each block's rows into one output tile and apply it in the output
    # pipeline (gather), or write the whole output wide and transform it after (materialize)
    bhq_inverse: str = _choice("gather", ("gather", "materialize"), "'gather' or 'materialize'")
    # whether the vector unit's passes run while the array computes an independent GEMM
    overlap: bool = field(default=False, metadata={"allowed": "true or false"})
    # whether a quantizer rides the passes of the ops between the GEMMs (BatchNorm, softmax):
    # its range and codes come out of their passes where that is cheaper (see
    # fqtsim.simulation.between), or runs passes of its own
    share_passes: bool = field(default=True, metadata={"allowed": "true or false"})
    # block-scaled (mxint) operands: elements along K that share one power-of-two scale; the
    # output pipeline's block-max logic and the array's shifters work on blocks of this size
    block: int = field(default=32, metadata={
        "test": lambda v: 2 <= v <= 256 and v & (v - 1) == 0, "allowed": "a power of two in 2..256"})


@dataclass(frozen=True)
class HWConfig:
    """A whole device: array, accumulator, memories, vector unit, energy table and mapping."""
    name: str = _check(lambda v: re.fullmatch(r"[\w.+-]+", v) is not None,
                       "a name of letters, digits and . _ + - (it names report files)")
    array: Array
    accumulator: Accumulator
    tcm: TCM
    ddr: DDR
    vector: Vector
    energy: MacEnergy
    mapping: Mapping
    description: str = ""
    # the energy table that figures left null come from (fqtsim.hardware.energy)
    technology: str | None = field(default=None, metadata={
        "test": lambda v: v is None or v in energy.TECHNOLOGIES,
        "allowed": f"null or one of {', '.join(energy.TECHNOLOGIES)} (fqtsim.hardware.energy)"})
    # the dotted keys whose figures came from the technology table (filled by load_hw)
    derived: tuple = field(default=(), metadata={"derived": True})
    pipeline: Pipeline = Pipeline()


def shipped_dir() -> Path | None:
    """The folder of the configs that ship with fqtsim: `fqtsim/hw_configs` in an installed wheel,
    the checkout's top-level `hw_configs/` in an editable install (None if neither is there)."""
    package = Path(__file__).resolve().parent.parent   # fqtsim/ (this file is fqtsim/hardware/hw.py)
    for folder in (package / "hw_configs", package.parent / "hw_configs"):
        if (folder / "npu.yaml").is_file():
            return folder
    return None


def shipped() -> list[str]:
    """Names of the shipped configs (npu, npu-acc24, ...), which `--hw NAME` also takes."""
    folder = shipped_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def resolve_hw(path: str | os.PathLike) -> Path:
    """Where config `path` is read from: the path itself if it exists; else, for a bare name
    (`npu`, `npu-acc24.yaml`) or a relative `hw_configs/NAME.yaml` (the default, from outside
    the checkout), the shipped config of that name; else the path as given (reading it fails)."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"hw config: got {path!r} ({type(path).__name__}); expected a path (str "
                        f"or pathlib.Path) to a YAML file, e.g. 'hw_configs/npu.yaml', or the name "
                        f"of a shipped config ({', '.join(shipped())})")
    p = Path(path)
    if not str(path).strip():
        raise ValueError(f"hw config: empty path; give a YAML file or one of the shipped configs "
                         f"({', '.join(shipped())})")
    if p.exists() or p.is_absolute():
        return p
    folder = shipped_dir()
    parts = p.parts
    if folder is not None and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "hw_configs")):
        name = parts[-1] if parts[-1].endswith((".yaml", ".yml")) else parts[-1] + ".yaml"
        if (folder / name).is_file():
            return folder / name
    return p


def with_block(hw: HWConfig, block: int | None) -> HWConfig:
    """`hw` with the block of its block-scaled (mxint) operands set to `block` (None: as the
    config has it): what `--block` does."""
    if block is None:
        return hw
    rule = {f.name: f.metadata for f in dataclasses.fields(Pipeline)}["block"]
    if isinstance(block, bool) or not isinstance(block, int) or not rule["test"](block):
        raise ValueError(f"--block: got {block!r}; expected {rule['allowed']} (values along K "
                         f"that share one scale)")
    return dataclasses.replace(hw, pipeline=dataclasses.replace(hw.pipeline, block=block))


def load_hw(path: str | os.PathLike) -> HWConfig:
    """Read, validate and build a hardware config; any problem raises one ValueError that names
    the file (a path that is not a str or os.PathLike: TypeError). `path` may also name a shipped
    config (see `resolve_hw`)."""
    path = resolve_hw(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        names = ", ".join(shipped())
        raise ValueError(f"{path}: cannot read the hardware config ({e.strerror}); give a path "
                         f"to a YAML file such as hw_configs/npu.yaml"
                         + (f", or a shipped config: {names}" if names else "")) from None
    except UnicodeDecodeError as e:
        utf16 = e.object[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start} is "
                         f"{e.object[e.start]:#04x}{'; it looks like UTF-16' if utf16 else ''}); "
                         f"a hardware config is YAML text in UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    try:
        hw = _build(HWConfig, raw, "")
        _check_consistency(hw)
        hw = derive(hw)
    except _SchemaError as e:
        raise ValueError(f"{path}: {e}") from None
    return hw


def as_hw(hw, argument: str = "hw") -> HWConfig:
    """An `HWConfig` as given, or loaded from a path (str or os.PathLike); anything else is a
    TypeError naming `argument`."""
    if isinstance(hw, HWConfig):
        return hw
    if isinstance(hw, (str, os.PathLike)):
        return load_hw(hw)
    raise TypeError(f"{argument}: got {hw!r} ({type(hw).__name__}); expected an HWConfig from "
                    f"fqtsim.load_hw(path), or a config path")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, without its '<unicode string>' source lines."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, yaml.reader.ReaderError):
        c = e.character
        c = f"{c:#04x}" if isinstance(c, int) else repr(c)
        return f"unacceptable character {c} at position {e.position}; not a text file?"
    return str(e).splitlines()[0]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (safe_load keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:   # an unhashable key: the schema check names it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice; give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _SchemaError(ValueError):
    pass


def _build(cls, raw, path):
    """Build dataclass `cls` from mapping `raw`, checking keys, types and ranges."""
    where = path or "top level"
    if not isinstance(raw, dict):
        raise _SchemaError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    fields = _keys(cls)
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


def _keys(cls) -> dict:
    """The YAML keys of dataclass `cls`: its fields but those load_hw derives."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}


def _convert(hint, value, key, f):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    base = next(t for t in options if t is not type(None))
    if dataclasses.is_dataclass(base):
        return _build(base, value, key)
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
    try:
        value = tuple(value) if base is tuple else base(value)
    except OverflowError:   # an integer too large for a float
        raise _SchemaError(f"{key}: got {value!r}; expected {_describe(hint, f)}") from None
    if not f.metadata.get("test", lambda v: True)(value):
        raise _SchemaError(f"{key}: got {value!r}; expected {_describe(hint, f)}")
    return value


def _describe(hint, f):
    if dataclasses.is_dataclass(hint):
        return "a mapping with keys " + ", ".join(_keys(hint))
    allowed = f.metadata.get("allowed")
    if allowed:
        return allowed
    return {bool: "true or false", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _check_consistency(hw: HWConfig):
    parts = hw.tcm.partitions
    if parts is not None and parts.a_kib + parts.b_kib + parts.out_kib > hw.tcm.size_kib:
        raise _SchemaError(f"tcm.partitions: A, B and output buffers of {parts.a_kib:g} + "
                           f"{parts.b_kib:g} + {parts.out_kib:g} KiB exceed tcm.size_kib = "
                           f"{hw.tcm.size_kib:g}; make them smaller or the TCM larger")
    acc = hw.accumulator
    if acc.spill_every is not None and acc.psum_bits < acc.bits:
        raise _SchemaError(f"accumulator.psum_bits: got {acc.psum_bits}, narrower than "
                           f"accumulator.bits = {acc.bits}; spills need psum_bits >= bits")


# Energy figures a config may leave null, by dotted key, and how each is derived from the table
VECTOR_OPS = tuple(energy.VECTOR_RULES)
DERIVABLE = ("tcm.read_pj_per_byte", "tcm.write_pj_per_byte", "ddr.read_pj_per_byte",
             "ddr.write_pj_per_byte", "energy.mult_8x8_pj", "energy.add_32_pj",
             *(f"vector.{op}.pj" for op in VECTOR_OPS), "energy.static_mw")


def derive(hw: HWConfig) -> HWConfig:
    """`hw` with every energy figure left null, or derived before (`hw.derived`), taken from its
    technology's table (`fqtsim.hardware.energy`); figures the config states stay as given.

    SRAM energy follows the TCM's capacity, so a TCM resized with dataclasses.replace gets its
    figure again from `derive`. A partitioned TCM prices each buffer at its own capacity: the A
    and B buffers' figures go to `tcm.operand_pj`; the rest (the output buffer and what the
    partitions leave, priced as one region of their joint capacity) to
    tcm.read/write_pj_per_byte."""
    redo = set(hw.derived)
    todo = [key for key in DERIVABLE if key in redo or _get(hw, key) is None]
    if hw.ddr.kind is not None and not any(k.startswith("ddr.") for k in todo):
        raise _SchemaError(f"ddr.kind: got {hw.ddr.kind!r}, but ddr.read_pj_per_byte and "
                           f"ddr.write_pj_per_byte are given; leave them null to take the "
                           f"{hw.ddr.kind} figure, or drop ddr.kind")
    tabled = [key for key in todo if key != "energy.static_mw"]   # static: from the others
    if not tabled:
        return _derive_static(hw, todo)
    tech = hw.technology
    if tech is None:
        raise _SchemaError(f"{tabled[0]}: null, but the config names no technology; give a "
                           f"number, or technology: {' or '.join(energy.TECHNOLOGIES)} to take it "
                           f"from that table (fqtsim.hardware.energy)")
    if hw.ddr.kind is not None and hw.ddr.kind not in energy.node(tech).dram_kinds:
        raise _SchemaError(f"ddr.kind: got {hw.ddr.kind!r}; the {tech} table lists "
                           f"{', '.join(energy.node(tech).dram_kinds)}")
    parts = hw.tcm.partitions
    # a partitioned TCM: the output buffer and what the partitions leave hold the outputs,
    # partial sums, wide tensors and optimizer state, one region beside A's and B's buffers
    rest_kib = hw.tcm.size_kib - parts.a_kib - parts.b_kib if parts else hw.tcm.size_kib
    sram = energy.sram_pj_per_byte(tech, rest_kib)
    mult, add = energy.mac_figures(tech)
    figures = {"tcm.read_pj_per_byte": sram, "tcm.write_pj_per_byte": sram,
               "ddr.read_pj_per_byte": energy.dram_pj_per_byte(tech, hw.ddr.kind),
               "ddr.write_pj_per_byte": energy.dram_pj_per_byte(tech, hw.ddr.kind),
               "energy.mult_8x8_pj": mult, "energy.add_32_pj": add,
               **{f"vector.{op}.pj": energy.vector_pj(tech, op) for op in VECTOR_OPS}}
    for key in tabled:
        hw = _set(hw, key, figures[key])
    operand_pj = hw.tcm.operand_pj
    if parts is not None and {"tcm.read_pj_per_byte", "tcm.write_pj_per_byte"} & set(todo):
        # a direction the config states stays as stated in every buffer
        operand_pj = tuple(
            tuple(energy.sram_pj_per_byte(tech, kib) if f"tcm.{d}_pj_per_byte" in todo
                  else _get(hw, f"tcm.{d}_pj_per_byte") for d in ("read", "write"))
            for kib in (parts.a_kib, parts.b_kib))
    return _derive_static(dataclasses.replace(hw, tcm=dataclasses.replace(hw.tcm, operand_pj=operand_pj)),
                          todo)


def _derive_static(hw: HWConfig, todo: list) -> HWConfig:
    """`hw` with `derived` = `todo` and, if static_mw is among them, its estimate."""
    if "energy.static_mw" in todo:
        hw = _set(hw, "energy.static_mw", energy.LEAKAGE_SHARE * peak_dynamic_mw(hw))
    return dataclasses.replace(hw, derived=tuple(todo))


def peak_dynamic_mw(hw: HWConfig) -> float:
    """The array's power at full rate: every MAC busy on its widest operands, and those operands
    read from TCM as fast as the array takes them (a row of A and a column of B per cycle)."""
    bits, tcm = hw.array.operand_bits, hw.tcm
    mac_pj = hw.array.rows * hw.array.cols * hw.energy.mac_pj(bits, bits, hw.accumulator.bits)
    read_pj = (hw.array.rows * tcm.pj_per_byte("read", "a")
               + hw.array.cols * tcm.pj_per_byte("read", "b")) * bits / 8
    return (mac_pj + read_pj) * hw.array.clock_mhz / 1e3   # pJ per cycle x MHz = uW


def at_technology(hw: HWConfig, technology: str) -> HWConfig:
    """`hw` with the figures it takes from its table taken from `technology`'s instead (figures
    the config states explicitly stay as they are)."""
    energy.node(technology)
    return derive(dataclasses.replace(hw, technology=technology))


def scale_energy(hw: HWConfig, *, ddr: float = 1.0, sram: float = 1.0, mac: float = 1.0,
                 static: float = 1.0) -> HWConfig:
    """`hw` with its DRAM and SRAM per-byte figures, its MAC figures (multiplier and adder, the
    partial-sum adds too) and its static power multiplied by the factors given: a sensitivity
    variant. The figures scaled are fixed numbers in it from then on (no longer re-derived)."""
    for name, factor in (("ddr", ddr), ("sram", sram), ("mac", mac), ("static", static)):
        if not (isinstance(factor, (int, float)) and 0 <= factor < math.inf):
            raise ValueError(f"{name}: got {factor!r}; expected a finite factor >= 0")
    tcm, d, e = hw.tcm, hw.ddr, hw.energy
    operand_pj = None if tcm.operand_pj is None else tuple(
        tuple(v * sram for v in buffer) for buffer in tcm.operand_pj)
    scaled = {"tcm.read_pj_per_byte": sram, "tcm.write_pj_per_byte": sram,
              "ddr.read_pj_per_byte": ddr, "ddr.write_pj_per_byte": ddr,
              "energy.mult_8x8_pj": mac, "energy.add_32_pj": mac}
    keep = tuple(k for k in hw.derived if scaled.get(k, 1.0) == 1.0)
    return dataclasses.replace(
        hw, derived=keep,
        tcm=dataclasses.replace(tcm, read_pj_per_byte=tcm.read_pj_per_byte * sram,
                                write_pj_per_byte=tcm.write_pj_per_byte * sram,
                                operand_pj=operand_pj),
        ddr=dataclasses.replace(d, read_pj_per_byte=d.read_pj_per_byte * ddr,
                                write_pj_per_byte=d.write_pj_per_byte * ddr),
        energy=dataclasses.replace(e, mult_8x8_pj=e.mult_8x8_pj * mac, add_32_pj=e.add_32_pj * mac,
                                   static_mw=e.static_mw * static))


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, dotted: str, value):
    head, _, rest = dotted.partition(".")
    inner = value if not rest else _set(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: inner})
