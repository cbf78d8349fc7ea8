"""Fuzz table of odd inputs: each gets one clear error that names the argument and what is
allowed, no traceback, and nothing written.

CLI cases: (argv, fragment of stderr); the command must exit 2 before doing any work, and the
current directory (a fresh temporary one) and the inputs must be left as they were. API cases:
(call, exception type, fragment of the message). Inputs (bad YAML files, a foreign output
directory) are made once per module in a separate folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import fqtsim
import fqtsim.cost as cost
from conftest import HW_DIR, hw_dict, set_key
from fqtsim.cli import main
from fqtsim.simulation.device import Device
from fqtsim.quantizers import (DelayedRange, fake_quantize, quantize_gradient, quantize_weight,
                               variance_bound)
from fqtsim.simulation.schedule import QuantScheme
from fqtsim.training.train import RunConfig
from kernels import int_gemm

NPU = str(HW_DIR / "npu.yaml")


def _variant(**overrides) -> str:
    d = hw_dict("npu")
    for key, value in overrides.items():
        set_key(d, key, value)
    return yaml.safe_dump(d)


# name -> file content (bytes or str), written under the inputs folder
INPUT_FILES = {
    "binary.yaml": bytes(range(256)),
    "nul.yaml": b"name: npu\x00\x01\n",
    "utf16.yaml": "name: npu\n".encode("utf-16"),
    "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
    "dup.yaml": "name: a\nname: b\n",
    "empty.yaml": "",
    "list.yaml": "- a\n- b\n",
    "bad-syntax.yaml": "name: [unclosed\n",
    "huge-energy.yaml": _variant(**{"ddr.read_pj_per_byte": 1e308}),
    "huge-vector.yaml": _variant(**{"vector.mul.pj": 1e300}),
    "huge-int.yaml": _variant(**{"tcm.size_kib": 10**400}),
    "huge-tcm.yaml": _variant(**{"tcm.size_kib": 1e300}),
    "tiny-bandwidth.yaml": _variant(**{"ddr.bytes_per_cycle": 1e-300}),
    "huge-array.yaml": _variant(**{"array.rows": 10**9}),
    "nan-clock.yaml": _variant(**{"array.clock_mhz": float("nan")}),
    "tiny-tcm.yaml": _variant(**{"tcm.size_kib": 0.001}),
    "four-bit.yaml": _variant(**{"array.operand_bits": 4}),
    "short-k-tile.yaml": _variant(**{"mapping.tile_m": 64, "mapping.tile_n": 64,
                                     "mapping.tile_k": 8, "accumulator.overflow": "saturate"}),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for name, content in INPUT_FILES.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine\n")
    (root / "not-a-run").mkdir()
    (root / "a-dir.yaml").mkdir()
    return root


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def sandbox(tmp_path, monkeypatch, inputs):
    """A fresh empty current directory; checks afterwards that it and the inputs are untouched."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _listing(inputs)
    yield inputs
    assert _listing(cwd) == {}, f"written: {sorted(_listing(cwd))}"
    assert _listing(inputs) == before


def I(name: str) -> str:   # noqa: E743 - a path in the inputs folder, filled in per test
    return "{inputs}/" + name


# ---------------------------------------------------------------------------------------------
# CLI: argv -> fragment of the one-line error (exit 2)
# ---------------------------------------------------------------------------------------------
GEMM = ["cost", "--gemm", "4x4x4"]
VAR = ["variance", "--out", "v"]

CLI_CASES = [
    # integer ranges, named by flag
    (["run", "--seed", "-1"], "argument --seed: got '-1'; expected an integer in 0..4294967295"),
    (["run", "--seed", "4294967296"], "argument --seed: got '4294967296'"),
    (["run", "--seed", "1.5"], "argument --seed: got '1.5'"),
    (["run", "--epochs", "0"], "argument --epochs: got '0'; expected an integer >= 1"),
    (["run", "--epochs", "-3"], "argument --epochs: got '-3'"),
    (["run", "--epochs", "many"], "argument --epochs: got 'many'"),
    (["run", "--batch-size", "0"], "argument --batch-size: got '0'; expected an integer >= 1"),
    (["run", "--batch-size", "-32"], "argument --batch-size: got '-32'"),
    (["run", "--grad-bits", "0"], "argument --grad-bits: '0': expected an integer in 2..8"),
    (["run", "--grad-bits", "1"], "argument --grad-bits: '1': expected an integer in 2..8"),
    (["run", "--grad-bits", "9"], "argument --grad-bits: '9': expected an integer in 2..8"),
    (["run", "--grad-bits", "-8"], "argument --grad-bits: '-8'"),
    (["run", "--lr", "nan"], "argument --lr: got 'nan'; expected a finite number > 0"),
    (["run", "--lr", "inf"], "argument --lr: got 'inf'; expected a finite number > 0"),
    (["run", "--lr", "-1"], "argument --lr: got '-1'; expected a finite number > 0"),
    (["run", "--lr", "-1e-3"], "argument --lr: got '-1e-3'"),
    (["run", "--lr", "0"], "argument --lr: got '0'"),
    (["run", "--lr", "fast"], "argument --lr: got 'fast'"),
    # choices
    (["run", "--model", "resnet"], "--model: got 'resnet'; expected one of mlp, mlp6, cnn, cnn8, gpt"),
    (["run", "--dataset", "imagenet"], "--dataset: got 'imagenet'; expected one of digits"),
    (["run", "--mode", "int4"], "--mode: got 'int4'; expected one of"),
    (["run", "--quantizer", "zsq"], "--quantizer: got 'zsq'; expected one of ptq, psq, bhq"),
    (["run", "--range", "static"], "--range: got 'static'; expected one of dynamic, delayed"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    # duplicate options
    (["run", "--epochs", "3", "--epochs", "5"], "argument --epochs: given twice"),
    (["run", "--epochs=3", "--epochs", "5"], "argument --epochs: given twice"),
    (["run", "--epochs", "3", "--epo", "5"], "argument --epochs (as --epo): given twice"),
    (["run", "--restart", "--restart"], "argument --restart: given twice"),
    (["run", "--hw", NPU, "--hw", NPU], "argument --hw: given twice"),
    (GEMM + ["--hw", NPU, "--hw", NPU], "argument --hw: given twice"),
    (GEMM + ["--quantizer", "ptq", "--quantizer", "psq"],
     "argument --quantizer: given twice; give each option once (several values go after one"),
    (["report", "--out", "r", "--out", "s"], "argument --out: given twice"),
    (["sweep", "--seed", "0", "1", "--seed", "2", "--out", "s"], "argument --seed: given twice"),
    (VAR + ["--draws", "4", "--draws", "8"], "argument --draws: given twice"),
    # hardware configs
    (["run", "--hw", "missing.yaml"], "missing.yaml: cannot read the hardware config"),
    (["run", "--hw", ""], "hw config: empty path"),
    (["run", "--hw", I("binary.yaml")], "binary.yaml: not a UTF-8 text file"),
    (GEMM + ["--hw", I("nul.yaml")], "nul.yaml: not valid YAML: unacceptable character 0x00"),
    (GEMM + ["--hw", I("utf16.yaml")], "utf16.yaml: not a UTF-8 text file (byte 0 is 0xff; it looks like UTF-16)"),
    (GEMM + ["--hw", I("latin1.yaml")], "latin1.yaml: not a UTF-8 text file"),
    (GEMM + ["--hw", I("dup.yaml")], "dup.yaml: not valid YAML: key 'name' given twice"),
    (GEMM + ["--hw", I("empty.yaml")], "empty.yaml: top level: expected a mapping"),
    (GEMM + ["--hw", I("bad-syntax.yaml")], "bad-syntax.yaml: not valid YAML"),
    (GEMM + ["--hw", I("huge-energy.yaml")], "huge-energy.yaml: ddr.read_pj_per_byte: got 1e+308; expected a finite number >= 0, at most 1e+06"),
    (GEMM + ["--hw", I("huge-vector.yaml")], "vector.mul.pj: got 1e+300"),
    (GEMM + ["--hw", I("huge-int.yaml")], "tcm.size_kib: got 1000"),
    (GEMM + ["--hw", I("huge-tcm.yaml")], "tcm.size_kib: got 1e+300; expected a finite number > 0, at most"),
    (GEMM + ["--hw", I("tiny-bandwidth.yaml")], "ddr.bytes_per_cycle: got 1e-300"),
    (GEMM + ["--hw", I("huge-array.yaml")], "array.rows: got 1000000000; expected an integer > 0, at most 65536"),
    (GEMM + ["--hw", I("nan-clock.yaml")], "array.clock_mhz: got nan"),
    (GEMM + ["--hw", I("a-dir.yaml")], "a-dir.yaml: cannot read the hardware config (Is a directory)"),
    (GEMM + ["--hw", "npu-acc99"], "npu-acc99: cannot read the hardware config"),
    # tiles that cannot fit, operand widths: refused before training, naming --hw
    (["run", "--hw", I("tiny-tcm.yaml"), "--dataset", "synthetic"],
     "tiny-tcm.yaml: npu cannot run this training"),
    (["run", "--hw", I("short-k-tile.yaml"), "--dataset", "synthetic"],
     "mapping.tile_k = 8 < K = 10 with several folds per tile parks partial sums"),
    (["run", "--hw", I("four-bit.yaml"), "--dataset", "synthetic"], "operand codes of at most 4 bits"),
    (["run", "--hw", I("tiny-tcm.yaml"), "--mode", "qat", "--dataset", "synthetic"],
     "cannot run this training"),
    # output directories
    (["run", "--out", "", "--mode", "fp32"], "--out: empty path"),
    (["run", "--out", ".", "--mode", "fp32", "--dataset", "synthetic"], "the current directory"),
    (["run", "--out", I("foreign"), "--mode", "fp32", "--dataset", "synthetic"], "did not write"),
    # cost
    (["cost", "--gemm", "-1x5x5"], "argument --gemm: '-1x5x5' is not MxKxN with positive integers"),
    (["cost", "--gemm", "0x5x5"], "'0x5x5' is not MxKxN"),
    (["cost", "--gemm", "5x5"], "'5x5' is not MxKxN"),
    (["cost", "--gemm", "axbxc"], "'axbxc' is not MxKxN"),
    (["cost", "--gemm", "4x4x4x4"], "'4x4x4x4' is not MxKxN"),
    (["cost", "--gemm", ""], "'' is not MxKxN"),
    (["cost"], "give --gemm MxKxN (one or more) or --model NAME"),
    (GEMM + ["--a-bits", "9"], "argument --a-bits: '9': expected an integer in 2..8"),
    (GEMM + ["--a-bits", "1"], "argument --a-bits: '1'"),
    (GEMM + ["--b-bits", "0"], "argument --b-bits: '0'"),
    (GEMM + ["--out-bits", "16"], "argument --out-bits: '16'"),
    (GEMM + ["--grad-bits", "-4"], "argument --grad-bits: '-4'"),
    (GEMM + ["--hw", I("four-bit.yaml"), "--a-bits", "8"], "a_bits: got 8; npu's MACs take operand codes of 2..4"),
    (GEMM + ["--writeback", "wide"], "argument --writeback: invalid choice: 'wide'"),
    (GEMM + ["--range", "static"], "argument --range: invalid choice: 'static'"),
    (GEMM + ["--quantizer", "zsq"], "argument --quantizer: invalid choice: 'zsq'"),
    (GEMM + ["--quantizer", "ptq", "ptq"], "--quantizer: ptq ptq names a value twice"),
    (GEMM + ["--quantizer", "ptq", "--range", "delayed", "delayed"], "--range: delayed delayed names a value twice"),
    (GEMM + ["--csv", ""], "--csv: empty path"),
    (GEMM + ["--csv", "."], "--csv: . is a directory"),
    # variance
    (["variance", "--run", "R", "--model", "cnn", "--out", "v"], "--model: not allowed with --run"),
    (["variance", "--run", "R", "--dataset", "digits", "--seed", "1", "--out", "v"],
     "--dataset, --seed: not allowed with --run"),
    (["variance", "--run", "R", "--epochs", "2", "--out", "v"], "--epochs: not allowed with --run"),
    (["variance", "--run", I("not-a-run"), "--out", "v"], "is not a finished fqtsim run directory"),
    (["variance", "--run", "nowhere", "--out", "v"], "--run: nowhere is not a finished"),
    (VAR + ["--draws", "1"], "argument --draws: got '1'; expected an integer >= 2"),
    (VAR + ["--batches", "1"], "argument --batches: got '1'; expected an integer >= 2"),
    (VAR + ["--batch-size", "0"], "argument --batch-size: got '0'"),
    (VAR + ["--epochs", "0"], "argument --epochs: got '0'"),
    (VAR + ["--seed", "-1"], "argument --seed: got '-1'"),
    (VAR + ["--bits", "9"], "argument --bits: '9': expected an integer in 2..8"),
    (VAR + ["--bits", "4", "4"], "--bits: 4 4 names a value twice"),
    (VAR + ["--quantizer", "zsq"], "argument --quantizer: invalid choice: 'zsq'"),
    (VAR + ["--model", "resnet"], "--model: got 'resnet'; expected one of mlp, mlp6, cnn, cnn8, gpt"),
    (VAR + ["--dataset", "cifar"], "--dataset: got 'cifar'"),
    (VAR + ["--batches", "1000"], "--batches: 1000 batches of 64 need 64000 samples"),
    (VAR + ["--hw", "missing.yaml"], "missing.yaml: cannot read the hardware config"),
    (["variance"], "the following arguments are required: --out"),
    # report, sweep, bench, top level
    (["report", "--batch", "0", "--out", "r"], "argument --batch: got '0'; expected an integer >= 1"),
    (["sweep", "--seed", "-1", "--out", "s"], "--seed: got -1; expected an integer in 0..4294967295"),
    (["sweep", "--lr", "nan", "--out", "s"], "--lr: got nan; expected a finite number > 0"),
    (["sweep", "--epochs", "0", "--out", "s"], "--epochs: got 0"),
    (["bench", "--rounds", "3"], "unrecognized arguments: --rounds 3"),
    ([], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, expect", CLI_CASES, ids=[" ".join(a)[:60] or "(none)" for a, _ in CLI_CASES])
def test_cli_refuses_clearly_and_writes_nothing(argv, expect, sandbox, capsys):
    argv = [a.replace("{inputs}", str(sandbox)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert expect.replace("{inputs}", str(sandbox)) in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0


# ---------------------------------------------------------------------------------------------
# API: call -> (exception type, fragment)
# ---------------------------------------------------------------------------------------------
def _hw():
    return fqtsim.load_hw(NPU)


def _codes(shape, dtype=np.int8):
    return np.ones(shape, dtype)


X = np.random.default_rng(0).standard_normal((6, 5))

API_CASES = [
    # load_hw
    ("load_hw(None)", lambda d: fqtsim.load_hw(None), TypeError, "hw config: got None (NoneType); expected a path"),
    ("load_hw(5)", lambda d: fqtsim.load_hw(5), TypeError, "got 5 (int); expected a path"),
    ("load_hw(bytes)", lambda d: fqtsim.load_hw(NPU.encode()), TypeError, "(bytes); expected a path"),
    ("load_hw('')", lambda d: fqtsim.load_hw(""), ValueError, "hw config: empty path"),
    ("load_hw(binary)", lambda d: fqtsim.load_hw(d / "binary.yaml"), ValueError, "binary.yaml: not a UTF-8 text file"),
    ("load_hw(utf16)", lambda d: fqtsim.load_hw(d / "utf16.yaml"), ValueError, "utf16.yaml: not a UTF-8"),
    ("load_hw(dup)", lambda d: fqtsim.load_hw(d / "dup.yaml"), ValueError, "key 'name' given twice"),
    ("load_hw(list)", lambda d: fqtsim.load_hw(d / "list.yaml"), ValueError, "top level: expected a mapping"),
    ("load_hw(1e308 pJ)", lambda d: fqtsim.load_hw(d / "huge-energy.yaml"), ValueError, "ddr.read_pj_per_byte"),
    ("load_hw(10**400)", lambda d: fqtsim.load_hw(d / "huge-int.yaml"), ValueError, "tcm.size_kib"),
    ("load_hw(dir)", lambda d: fqtsim.load_hw(d / "a-dir.yaml"), ValueError, "Is a directory"),
    # Device
    ("Device(5)", lambda d: Device(5), TypeError, "hw: got 5 (int); expected an HWConfig"),
    ("Device(None)", lambda d: Device(None), TypeError, "hw: got None"),
    ("Device('missing')", lambda d: Device("missing.yaml"), ValueError, "missing.yaml: cannot read"),
    ("gemm(lists)", lambda d: Device(_hw()).gemm([[1, 2]], [[1], [2]]), TypeError, "a: got a list; expected a numpy array of int8"),
    ("gemm(int32)", lambda d: Device(_hw()).gemm(_codes((2, 2), np.int32), _codes((2, 2))), ValueError, "a: dtype int32"),
    ("gemm(float)", lambda d: Device(_hw()).gemm(_codes((2, 2)), _codes((2, 2), np.float32)), ValueError, "b: dtype float32"),
    ("gemm(shapes)", lambda d: Device(_hw()).gemm(_codes((2, 3)), _codes((2, 2))), ValueError, "inner dimensions differ"),
    ("gemm(1-D)", lambda d: Device(_hw()).gemm(_codes(3), _codes((3, 2))), ValueError, "expected 2-D codes"),
    ("gemm(range)", lambda d: Device(_hw()).gemm(_codes((2, 2)) * 100, _codes((2, 2)), a_bits=4), ValueError, "outside the 4-bit signed range"),
    ("gemm(a_bits=9)", lambda d: Device(_hw()).gemm(_codes((2, 2)), _codes((2, 2)), a_bits=9), ValueError, "a_bits: got 9"),
    ("gemm(name=5)", lambda d: Device(_hw()).gemm(_codes((2, 2)), _codes((2, 2)), name=5), TypeError, "name: got 5"),
    ("matmul(arrays)", lambda d: Device(_hw()).matmul(_codes((2, 2)), _codes((2, 2))), TypeError, "a: got ndarray; expected a Quantized"),
    # cost.gemm
    ("cost(hw=None)", lambda d: cost.gemm(None, 4, 4, 4), TypeError, "hw: got None"),
    ("cost(m=True)", lambda d: cost.gemm(_hw(), True, 4, 4), ValueError, "m: got True; GEMM dimensions must be integers >= 1"),
    ("cost(n=4.0)", lambda d: cost.gemm(_hw(), 4, 4.0, 4), ValueError, "n: got 4.0"),
    ("cost(k=0)", lambda d: cost.gemm(_hw(), 4, 4, 0), ValueError, "k: got 0"),
    ("cost(k=-1)", lambda d: cost.gemm(_hw(), 4, 4, np.int64(-1)), ValueError, "k: got"),
    ("cost(a_quant='zsq')", lambda d: cost.gemm(_hw(), 4, 4, 4, a_quant="zsq"), ValueError, "a_quant: got 'zsq'; expected a QuantScheme or one of ptq, psq, bhq"),
    ("cost(a_quant=5)", lambda d: cost.gemm(_hw(), 4, 4, 4, a_quant=5), TypeError, "a_quant: got 5"),
    ("cost(a_bits=1)", lambda d: cost.gemm(_hw(), 4, 4, 4, a_bits=1), ValueError, "a_bits: got 1"),
    ("cost(a_bits=True)", lambda d: cost.gemm(_hw(), 4, 4, 4, a_bits=True), ValueError, "a_bits: got True"),
    ("cost(out_bits=9)", lambda d: cost.gemm(_hw(), 4, 4, 4, out_bits=9), ValueError, "out_bits: got 9"),
    ("cost(writeback)", lambda d: cost.gemm(_hw(), 4, 4, 4, writeback="wide"), ValueError, "writeback: got 'wide'"),
    ("cost(scope=list)", lambda d: cost.gemm(_hw(), 4, 4, 4, scope=["rows"]), ValueError, "scope: got ['rows']"),
    ("cost(a_offset='yes')", lambda d: cost.gemm(_hw(), 4, 4, 4, a_offset="yes"), TypeError, "a_offset: got 'yes'"),
    ("cost(name=1)", lambda d: cost.gemm(_hw(), 4, 4, 4, name=1), TypeError, "name: got 1"),
    ("step(model)", lambda d: cost.training_step(_hw(), "resnet7", 4), ValueError, "model: got 'resnet7'"),
    ("step(model=[])", lambda d: cost.training_step(_hw(), [], 4), TypeError, "model: got []"),
    ("step(batch=0)", lambda d: cost.training_step(_hw(), "mlp", 0), ValueError, "batch: got 0"),
    ("step(batch=True)", lambda d: cost.training_step(_hw(), "mlp", True), ValueError, "batch: got True"),
    ("step(quantizer)", lambda d: cost.training_step(_hw(), "mlp", 4, "zsq"), ValueError, "quantizer: got 'zsq'"),
    ("step(range)", lambda d: cost.training_step(_hw(), "mlp", 4, "psq", "static"), ValueError, "range policy: got 'static'"),
    ("overhead(zsq)", lambda d: cost.overhead(_hw(), 4, 4, 4, ["zsq"]), ValueError, "schemes: got 'zsq'"),
    ("QuantScheme(range)", lambda d: QuantScheme("psq", "static"), ValueError, "range policy: got 'static'"),
    ("QuantScheme(rows=0)", lambda d: QuantScheme("psq", rows_per_sample=0), ValueError, "rows_per_sample: got 0"),
    ("QuantScheme(shared)", lambda d: QuantScheme("psq", shared_at="l2"), ValueError, "shared_at: got 'l2'"),
    # quantizers
    *[(f"fake_quantize(empty, {m})", lambda d, m=m: fake_quantize(np.zeros((0, 4)), m, 4), ValueError,
       "x: shape (0, 4) holds no values") for m in ("ptq", "psq", "bhq")],
    *[(f"fake_quantize(no columns, {m})", lambda d, m=m: fake_quantize(np.zeros((4, 0)), m, 4), ValueError,
       "x: shape (4, 0) holds no values") for m in ("ptq", "psq", "bhq")],
    *[(f"fake_quantize(complex, {m})", lambda d, m=m: fake_quantize(X * 1j, m, 4), ValueError,
       "x: complex values") for m in ("ptq", "psq", "bhq")],
    *[(f"fake_quantize(nan, {m})", lambda d, m=m: fake_quantize(np.where(X > 1, np.nan, X), m, 4),
       ValueError, "NaN or Inf values") for m in ("ptq", "psq", "bhq")],
    ("fake_quantize(inf)", lambda d: fake_quantize(np.full((2, 2), np.inf), "psq", 4), ValueError, "4 NaN or Inf"),
    ("fake_quantize(str)", lambda d: fake_quantize(np.array([["a", "b"]]), "ptq", 4), ValueError, "dtype <U1 is not a real number type"),
    ("fake_quantize(ragged)", lambda d: fake_quantize([[1.0], [1.0, 2.0]], "ptq", 4), ValueError, "not a rectangular array"),
    ("fake_quantize(1-D)", lambda d: fake_quantize(np.ones(4), "ptq", 4), ValueError, "x: got a 1-D array; quantizers take 2-D"),
    ("fake_quantize(3-D)", lambda d: fake_quantize(np.ones((2, 2, 2)), "bhq", 4), ValueError, "x: got a 3-D array"),
    *[(f"fake_quantize(bits={b!r})", lambda d, b=b: fake_quantize(X, "psq", b), ValueError,
       f"bits: got {b!r}; quantizers take 2..8 bits") for b in (0, 1, 9, True, 4.0)],
    ("fake_quantize(method)", lambda d: fake_quantize(X, "xyz", 4), ValueError, "method: got 'xyz'"),
    ("fake_quantize(method=list)", lambda d: fake_quantize(X, ["ptq"], 4), ValueError, "method: got ['ptq']"),
    ("quantize(rng=5)", lambda d: quantize_gradient(X, "ptq", 4, 5), TypeError, "rng: got 5 (int); expected a numpy.random.Generator"),
    ("quantize(lo only)", lambda d: quantize_gradient(X, "ptq", 4, lo=-1.0), ValueError, "lo, hi: give both"),
    ("quantize(lo > hi)", lambda d: quantize_gradient(X, "ptq", 4, lo=1.0, hi=-1.0), ValueError, "lo exceeds hi"),
    ("quantize(lo nan)", lambda d: quantize_gradient(X, "ptq", 4, lo=np.nan, hi=1.0), ValueError, "lo: NaN or Inf"),
    ("quantize(lo shape)", lambda d: quantize_gradient(X, "psq", 4, lo=np.zeros(4), hi=np.ones(4)), ValueError, "lo: shape (4,) does not broadcast to (6, 1)"),
    ("quantize(lo str)", lambda d: quantize_gradient(X, "ptq", 4, lo="low", hi=1.0), ValueError, "lo: got 'low'"),
    ("quantize(rows=0)", lambda d: quantize_gradient(X, "psq", 4, rows_per_sample=0), ValueError, "rows_per_sample: got 0"),
    ("quantize(rows=4)", lambda d: quantize_gradient(X, "psq", 4, rows_per_sample=4), ValueError, "rows_per_sample: 4 does not divide the 6 rows"),
    ("quantize_weight(empty)", lambda d: quantize_weight(np.zeros((0, 3))), ValueError, "w: shape (0, 3) holds no values"),
    ("quantize_weight(nan)", lambda d: quantize_weight(np.array([[np.nan]])), ValueError, "w: 1 NaN or Inf weights"),
    ("quantize_weight(complex)", lambda d: quantize_weight(np.ones((2, 2)) * 1j), ValueError, "w: complex values"),
    ("variance_bound(1-D)", lambda d: variance_bound(np.ones(3), "ptq", 4), ValueError, "x: got a 1-D array"),
    ("variance_bound(method)", lambda d: variance_bound(X, "pcq", 4), ValueError, "method: got 'pcq'"),
    ("DelayedRange(0)", lambda d: DelayedRange(0), ValueError, "history: got 0"),
    ("DelayedRange(True)", lambda d: DelayedRange(True), ValueError, "history: got True"),
    ("DelayedRange(margin)", lambda d: DelayedRange(margin=0.5), ValueError, "margin: got 0.5"),
    ("DelayedRange(margin=inf)", lambda d: DelayedRange(margin=float("inf")), ValueError, "margin: got inf; expected a finite number >= 1"),
    # kernels
    ("int_gemm(psum < acc)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), acc_bits=32, spill_every=2, psum_bits=16), ValueError, "psum_bits: got 16, narrower than acc_bits = 32"),
    ("int_gemm(lists)", lambda d: int_gemm([[1]], [[1]]), ValueError, "a: expected a numpy array of int8 or uint8"),
    ("int_gemm(int16)", lambda d: int_gemm(_codes((2, 2), np.int16), _codes((2, 2))), ValueError, "a: dtype int16 is not allowed"),
    ("int_gemm(float)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2), np.float64)), ValueError, "b: dtype float64"),
    ("int_gemm(shapes)", lambda d: int_gemm(_codes((2, 3)), _codes((2, 2))), ValueError, "inner dimensions differ"),
    ("int_gemm(empty)", lambda d: int_gemm(_codes((0, 2)), _codes((2, 2))), ValueError, "has an empty dimension"),
    ("int_gemm(acc 7)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), acc_bits=7), ValueError, "acc_bits: got 7; allowed: an int from 8 to 64"),
    ("int_gemm(acc 65)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), acc_bits=65), ValueError, "acc_bits: got 65"),
    ("int_gemm(acc True)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), acc_bits=True), ValueError, "acc_bits: got True"),
    ("int_gemm(overflow)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), overflow="clamp"), ValueError, "overflow: got 'clamp'"),
    ("int_gemm(spill 0)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), spill_every=0), ValueError, "spill_every: got 0"),
    ("int_gemm(spill True)", lambda d: int_gemm(_codes((2, 2)), _codes((2, 2)), spill_every=True), ValueError, "spill_every: got True"),
    # run and variance configs
    ("RunConfig(seed=-1)", lambda d: RunConfig(seed=-1), ValueError, "--seed: got -1"),
    ("RunConfig(seed=True)", lambda d: RunConfig(seed=True), ValueError, "--seed: got True"),
    ("RunConfig(lr=inf)", lambda d: RunConfig(lr=float("inf")), ValueError, "--lr: got inf; expected a finite number > 0"),
    ("RunConfig(lr=nan)", lambda d: RunConfig(lr=float("nan")), ValueError, "--lr: got nan"),
    ("variance.run(--run + model)", lambda d: __import__("fqtsim.analysis.variance").analysis.variance.run("v", from_run="R", model="cnn"), ValueError, "--model: not allowed with --run"),
]


@pytest.mark.parametrize("call, error, expect", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_clearly_and_writes_nothing(call, error, expect, sandbox):
    with pytest.raises(error) as caught:
        call(sandbox)
    assert expect in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------
# What is accepted: numpy integers as sizes, method names as schemes, paths as configs
# ---------------------------------------------------------------------------------------------
def test_numpy_integers_and_method_names_are_accepted():
    hw = _hw()
    ints = cost.gemm(hw, np.int64(8), np.int32(8), np.uint16(8), a_bits=np.int64(4))
    assert ints.equals(cost.gemm(hw, 8, 8, 8, a_bits=4))
    assert cost.gemm(hw, 8, 8, 8, a_quant="psq").equals(cost.gemm(hw, 8, 8, 8, a_quant=QuantScheme("psq")))
    assert cost.training_step(NPU, "mlp", np.int64(4)).equals(cost.training_step(hw, "mlp", 4))
    c = Device(NPU).gemm(_codes((2, 3)), _codes((3, 2)), a_bits=np.int64(2))
    assert (c == 3).all()


def test_shipped_configs_resolve_by_name_and_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not Path("hw_configs/npu.yaml").exists()
    assert fqtsim.load_hw("hw_configs/npu.yaml") == fqtsim.load_hw(NPU)   # the default --hw
    assert fqtsim.load_hw("npu-acc24").name == "npu-acc24"
    assert fqtsim.load_hw("dsp.yaml").name == "dsp"
    assert os.listdir(tmp_path) == []


def test_every_subcommand_help_shows_defaults(capsys):
    for command in ("run", "cost", "variance", "sweep", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "default" in out, command
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 20)", "(default: 32)", "(default: 0.05)", "(default: 0)", "shipped config"):
        assert shown in out, shown


def test_bench_logs_a_line_per_round_off_a_terminal(caplog):
    from fqtsim.analysis.bench import gemm_bench
    with caplog.at_level("INFO", logger="fqtsim.analysis.bench"):
        table = gemm_bench(shapes=[(8, 8, 8)], modes=["acc32"], repeat=1, rounds=2)
    assert len(table) == 1
    assert [r.getMessage().split(",")[0] for r in caplog.records] == \
        ["bench gemm: round 1/2", "bench gemm: round 2/2"]
