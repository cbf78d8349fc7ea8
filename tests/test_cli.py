"""The fqtsim command itself: output, CSV, and one-line errors with exit code 2."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.cli import main


def test_cost_prints_table_and_writes_csv(tmp_path, capsys):
    csv = tmp_path / "out" / "costs.csv"
    assert main(["cost", "--hw", str(HW_DIR / "npu-acc24.yaml"), "--gemm", "128x784x512",
                 "--gemm", "4096x576x64", "--writeback", "materialized", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "npu-acc24" in out and "psum_spill" in out and "ddr_bytes" in out
    table = pd.read_csv(csv)
    assert set(table.gemm) == {"128x784x512", "4096x576x64"}
    assert table[table.event == "mac_8x8"]["count"].tolist() == [128 * 784 * 512, 4096 * 576 * 64]
    assert [p.name for p in csv.parent.iterdir()] == ["costs.csv"]  # no temporary left behind


@pytest.mark.parametrize("args, expect", [
    (["cost", "--gemm", "12x0x3"], "'12x0x3' is not MxKxN"),
    (["cost", "--gemm", "4x4x4", "--hw", "missing.yaml"], "missing.yaml: cannot read"),
    (["cost", "--gemm", "4x4x4", "--a-bits", "9"], "expected an integer in 2..8"),
    (["run", "--track-variance", "-1"], "expected an integer >= 0"),
    (["run", "--mode", "qat", "--track-variance", "2"], "only --mode fqt has"),
])
def test_bad_input_is_one_line_and_exit_2(args, expect, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fqtsim.cli", "cost", "--gemm", "64x64x64"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "64x64x64" in done.stdout


def test_cost_quantizer_overhead_table(tmp_path, capsys):
    csv = tmp_path / "overhead.csv"
    assert main(["cost", "--hw", str(HW_DIR / "npu.yaml"), "--gemm", "128x784x512",
                 "--quantizer", "ptq", "psq", "bhq", "--range", "dynamic", "delayed",
                 "--grad-bits", "4", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "extra over the fused baseline" in out and "bhq" in out
    table = pd.read_csv(csv).set_index(["quantizer", "range"])
    assert len(table) == 6
    # the baseline is delayed PTQ (ranges known beforehand); delayed PSQ costs what it does
    assert (table.xs("dynamic", level="range")["extra_energy_pj"] > 0).all()
    assert table.loc[("bhq", "delayed"), "extra_energy_pj"] > 0      # it still writes dY wide
    assert table.loc[("ptq", "delayed"), "extra_energy_pj"] == 0
    assert table.loc[("psq", "delayed"), "extra_energy_pj"] == 0
    assert table.loc[("bhq", "dynamic"), "extra_ddr_bytes"] > table.loc[("ptq", "dynamic"), "extra_ddr_bytes"]


def test_cost_rejects_unknown_quantizer(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["cost", "--gemm", "4x4x4", "--quantizer", "zsq"])
    assert stop.value.code == 2 and "invalid choice: 'zsq'" in capsys.readouterr().err


def test_cost_of_a_training_step_over_delayed_ptq(tmp_path, capsys):
    csv = tmp_path / "step.csv"
    assert main(["cost", "--model", "cnn", "--batch", "16", "--quantizer", "psq", "bhq",
                 "--range", "dynamic", "delayed", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "extra over delayed PTQ" in out
    table = pd.read_csv(csv).set_index(["quantizer", "range", "shared"])
    assert len(table) == 8
    assert table.loc[("psq", "delayed", True), "extra_mJ"] == 0
    assert (table.xs("dynamic", level="range").extra_mJ > 0).all()
    # riding BatchNorm's passes never costs more than passes of one's own
    for q in ("psq", "bhq"):
        assert table.loc[(q, "dynamic", True), "step_mJ"] <= table.loc[(q, "dynamic", False), "step_mJ"]
    with pytest.raises(SystemExit) as stop:
        main(["cost", "--quantizer", "psq"])
    assert stop.value.code == 2 and "give --gemm MxKxN" in capsys.readouterr().err
