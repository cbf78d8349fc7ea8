"""Energy tables, SRAM energy by capacity, static power, the shipped configs' figures, and the
worst-case accumulator bounds."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import yaml

import fqtsim
import fqtsim.cost
from conftest import HW_DIR, SHIPPED, hw_dict
from fqtsim.cli import main
from fqtsim.hardware import energy, overflow
from fqtsim.hardware.hw import DERIVABLE, at_technology, derive, peak_dynamic_mw, scale_energy
from fqtsim.simulation.device import Device
from fqtsim.simulation.workloads import mlp, workload

NPU = HW_DIR / "npu.yaml"


# The published points, as the sources give them (pJ per 64-bit access)
@pytest.mark.parametrize("tech, kib, pj", [("45nm", 8, 10), ("45nm", 32, 20), ("45nm", 1024, 100),
                                           ("7nm", 8, 7.5), ("7nm", 32, 8.5), ("7nm", 1024, 14)])
def test_sram_curve_passes_through_the_published_points(tech, kib, pj):
    assert energy.sram_pj_per_byte(tech, kib) == pytest.approx(pj / 8, rel=1e-12)


@pytest.mark.parametrize("tech", energy.TECHNOLOGIES)
def test_sram_curve_lies_between_neighbours_log_log(tech):
    points = energy.node(tech).sram_pj_per_access
    for (c0, e0), (c1, e1) in zip(points, points[1:]):
        mid = math.sqrt(c0 * c1)   # halfway in log capacity: the geometric mean of the energies
        assert energy.sram_pj_per_byte(tech, mid) == pytest.approx(math.sqrt(e0 * e1) / 8)
        inside = [energy.sram_pj_per_byte(tech, c) for c in np.geomspace(c0, c1, 9)]
        assert all(e0 / 8 - 1e-12 <= x <= e1 / 8 + 1e-12 for x in inside)
        assert inside == sorted(inside)
    # past the ends along the end segments: 2 MiB at 45 nm is 100 pJ x 2^(log 5 / log 32)
    assert energy.sram_pj_per_byte("45nm", 2048) == pytest.approx(100 * 2 ** (math.log(5) / math.log(32)) / 8)
    assert energy.sram_pj_per_byte("45nm", 2) == pytest.approx(10 * 0.25 ** 0.5 / 8)
    with pytest.raises(ValueError, match="capacity_kib: got 0"):
        energy.sram_pj_per_byte(tech, 0)
    with pytest.raises(ValueError, match="technology: got '5nm'; expected one of 45nm, 7nm"):
        energy.sram_pj_per_byte("5nm", 64)


def test_tables_hold_the_sources_figures_and_the_ratios_jouppi_states():
    h, j = energy.node("45nm"), energy.node("7nm")
    assert (h.add_pj(8), h.add_pj(32), h.mult_pj(8), h.mult_pj(32)) == (0.03, 0.1, 0.2, 3.1)
    assert (j.add_pj(8), j.add_pj(32), j.mult_pj(8), j.mult_pj(32)) == (0.007, 0.03, 0.07, 1.48)
    assert energy.dram_pj_per_byte("45nm") == energy.dram_pj_per_byte("7nm") == 1300 / 8
    assert energy.dram_pj_per_byte("7nm", "hbm2") == 350 / 8
    with pytest.raises(ValueError, match="ddr.kind: got 'hbm2'; the 45nm table lists ddr"):
        energy.dram_pj_per_byte("45nm", "hbm2")
    # Jouppi et al.: adders 2.4-4.3x, multipliers 2.1-3.2x, small SRAMs 1.3-2.4x cheaper at 7 nm
    adds = [h.add_pj(b) / j.add_pj(b) for b in (8, 32)] + \
           [dict(h.float_pj)[f] / dict(j.float_pj)[f] for f in ("fp16_add", "fp32_add")]
    mults = [h.mult_pj(b) / j.mult_pj(b) for b in (8, 32)] + \
            [dict(h.float_pj)[f] / dict(j.float_pj)[f] for f in ("fp16_mult", "fp32_mult")]
    assert round(min(adds), 1) == 2.4 and round(max(adds), 1) == 4.3
    assert round(min(mults), 1) == 2.1 and round(max(mults), 1) == 3.2
    assert [round(e45 / e7, 1) for (_, e45), (_, e7) in
            zip(h.sram_pj_per_access[:2], j.sram_pj_per_access[:2])] == [1.3, 2.4]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_take_every_figure_from_the_table_they_name(name):
    hw = fqtsim.load_hw(HW_DIR / f"{name}.yaml")
    assert hw.technology in energy.TECHNOLOGIES and set(hw.derived) == set(DERIVABLE)
    tech, parts = hw.technology, hw.tcm.partitions
    sram = energy.sram_pj_per_byte(tech, parts.out_kib if parts else hw.tcm.size_kib)
    assert hw.tcm.read_pj_per_byte == hw.tcm.write_pj_per_byte == sram
    assert hw.ddr.read_pj_per_byte == hw.ddr.write_pj_per_byte == energy.dram_pj_per_byte(tech)
    assert (hw.energy.mult_8x8_pj, hw.energy.add_32_pj) == energy.mac_figures(tech)
    for op in energy.VECTOR_RULES:
        assert getattr(hw.vector, op).pj == energy.vector_pj(tech, op)
    assert hw.energy.static_mw == pytest.approx(energy.LEAKAGE_SHARE * peak_dynamic_mw(hw))
    if parts is not None:   # each buffer at its own capacity
        assert hw.tcm.operand_pj == ((energy.sram_pj_per_byte(tech, parts.a_kib),) * 2,
                                     (energy.sram_pj_per_byte(tech, parts.b_kib),) * 2)


def test_the_default_npu_figures_old_and_new():
    hw = fqtsim.load_hw(NPU)
    # 256 KiB between Horowitz's 32 KB (20 pJ) and 1 MB (100 pJ) banks, not the 32 KB bank's 2.5
    assert hw.tcm.read_pj_per_byte == pytest.approx(20 * 8 ** (math.log(5) / math.log(32)) / 8)
    assert 6.5 < hw.tcm.read_pj_per_byte < 6.6
    assert hw.ddr.read_pj_per_byte == 162.5   # 45 nm DRAM, not a modern LPDDR4's 40
    assert hw.vector.requant.pj == pytest.approx(3.3) and hw.vector.rng.pj == pytest.approx(0.18)
    # peak: 256 MACs of 0.3 pJ and 32 operand bytes a cycle at 800 MHz
    assert peak_dynamic_mw(hw) == pytest.approx((256 * 0.3 + 32 * hw.tcm.read_pj_per_byte) * 0.8)


def test_npu_7nm_is_npu_at_the_other_node():
    seven = fqtsim.load_hw(HW_DIR / "npu-7nm.yaml")
    moved = at_technology(fqtsim.load_hw(NPU), "7nm")
    assert dataclasses.replace(moved, name=seven.name, description=seven.description) == seven
    assert seven.energy.mac_pj(8, 8, 32) == pytest.approx(0.1)
    assert seven.tcm.read_pj_per_byte == pytest.approx(energy.sram_pj_per_byte("7nm", 256))


def test_resized_tcm_follows_the_curve_and_stated_figures_stay(make_hw):
    hw = fqtsim.load_hw(NPU)
    small = derive(dataclasses.replace(hw, tcm=dataclasses.replace(hw.tcm, size_kib=32.0)))
    assert small.tcm.read_pj_per_byte == 2.5 and small.energy.static_mw < hw.energy.static_mw
    stated = make_hw("npu", **{"tcm.read_pj_per_byte": 3.0, "tcm.write_pj_per_byte": 4.0})
    assert "tcm.read_pj_per_byte" not in stated.derived
    resized = derive(dataclasses.replace(stated, tcm=dataclasses.replace(stated.tcm, size_kib=32.0)))
    assert (resized.tcm.read_pj_per_byte, resized.tcm.write_pj_per_byte) == (3.0, 4.0)


def test_scaled_figures_scale_and_are_no_longer_derived():
    hw = fqtsim.load_hw(NPU)
    v = scale_energy(hw, ddr=2, sram=0.5, mac=4, static=0)
    assert v.ddr.read_pj_per_byte == 325 and v.tcm.write_pj_per_byte == hw.tcm.write_pj_per_byte / 2
    assert v.energy.mac_pj(8, 8, 32) == pytest.approx(1.2) and v.energy.static_mw == 0
    assert "ddr.read_pj_per_byte" not in v.derived and "vector.mul.pj" in v.derived
    assert derive(v).ddr.read_pj_per_byte == 325   # re-deriving keeps what was scaled
    with pytest.raises(ValueError, match="ddr: got -1; expected a finite factor >= 0"):
        scale_energy(hw, ddr=-1)


def test_partitioned_tcm_prices_operand_reads_at_their_buffer():
    hw = fqtsim.load_hw(HW_DIR / "reference-os16.yaml")   # A, B 64 KiB, output 32 KiB
    led = fqtsim.cost.gemm(hw, 64, 64, 256)
    r = {(x.event, x.level): x for x in led.itertuples()}
    a64, out32 = energy.sram_pj_per_byte("45nm", 64), energy.sram_pj_per_byte("45nm", 32)
    assert r["read_a", "tcm"].energy_pj == pytest.approx(r["read_a", "tcm"].bytes * a64)
    assert r["load_b", "ddr"].energy_pj == pytest.approx(r["load_b", "ddr"].bytes * (162.5 + a64))
    assert r["writeback", "ddr"].energy_pj == pytest.approx(r["writeback", "ddr"].bytes * (2 * out32 + 162.5))


def test_static_energy_is_power_times_elapsed_time(make_hw):
    hw = make_hw("npu", **{"energy.static_mw": 50.0})
    led = fqtsim.cost.gemm(hw, 128, 512, 784)
    static = led[led.event == "static"]
    assert len(static) == 1 and static.level.iloc[0] == "chip"
    assert (static["count"] == 0).all() and (static.cycles == 0).all()
    cycles = led.cycles.sum()   # still the elapsed cycles
    assert static.energy_pj.iloc[0] == pytest.approx(50.0 * cycles / 800 * 1e3)   # mW x us = nJ
    none = fqtsim.cost.gemm(make_hw("npu", **{"energy.static_mw": 0}), 128, 512, 784)
    assert "static" not in set(none.event) and none.cycles.sum() == cycles


def test_device_and_closed_form_charge_the_same_leakage():
    hw = fqtsim.load_hw(NPU)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (70, 300)).astype(np.uint8)
    b = rng.integers(-127, 128, (300, 90)).astype(np.int8)
    dev = Device(hw)
    dev.gemm(a, b, name="g", writeback="materialized")
    closed = fqtsim.cost.gemm(hw, 70, 90, 300, name="g", writeback="materialized")
    emulated = dev.ledger
    assert emulated.loc[emulated.event == "static", "energy_pj"].item() == pytest.approx(
        closed.loc[closed.event == "static", "energy_pj"].item(), rel=1e-12)


def test_training_step_leakage_is_a_pass_of_its_own_and_part_of_what_quantizers_add():
    from fqtsim.analysis.report import by_pass, quantizer_energy
    hw = fqtsim.load_hw(NPU)
    led = fqtsim.cost.training_step(hw, "mlp", 64, "psq")
    passes = by_pass(led)
    rate = hw.energy.static_mw / hw.array.clock_mhz * 1e3   # pJ per cycle
    assert passes.loc["leakage", "energy_pj"] == pytest.approx(rate * led.cycles.sum())
    extra = quantizer_energy(led)
    backward = by_pass(led[led.gemm.isin(["grad_input", "grad_weight", "between_grad"])])
    quantizer_cycles = backward.cycles.reindex(["wide write-back", "range pass", "sort + transform",
                                                "requantization", "zero-point"], fill_value=0).sum()
    assert extra["leakage"] == pytest.approx(rate * quantizer_cycles) and extra["leakage"] > 0


# Accumulator bounds

def test_code_ranges_as_fqtsim_makes_codes():
    assert overflow.code_range(8, "unsigned") == (0, 255)
    assert overflow.code_range(8, "signed") == (-128, 127)
    assert overflow.code_range(8, "symmetric") == (-127, 127)
    assert overflow.code_range(4, "affine") == (-8, 15)
    assert overflow.bits_needed(-128, 127) == 8 and overflow.bits_needed(0, 128) == 9
    with pytest.raises(ValueError, match="kind: got 'float'"):
        overflow.code_range(8, "float")


def acc16_yaml(folder):
    """npu-acc16 as it shipped (16-bit saturating accumulators spilling every 16 MACs), as a
    YAML file in `folder`."""
    d = hw_dict("npu-acc24")
    d["name"] = "npu-acc16"
    d["accumulator"] |= {"bits": 16, "spill_every": 16}
    path = folder / "npu-acc16.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_the_old_acc16_config_overflows_by_construction(tmp_path):
    hw = fqtsim.load_hw(acc16_yaml(tmp_path))
    b = overflow.gemm_bound(hw, 784)   # activation codes by weight codes
    assert b.product == (-255 * 127, 255 * 127) and b.run == 16
    assert b.accumulator[1] == 16 * 255 * 127 == 518_160 and 2 ** 18 < 518_160 < 2 ** 19
    assert b.acc_overflows and not b.psum_overflows and b.k_max == 1   # two products already overflow
    line, warnings = overflow.summary(hw, overflow.training_bounds(hw, mlp(), 100))
    assert "518,160 (2^19.0, 20 bits) over 16 products in the 16-bit accumulator" in line
    assert len(warnings) == 1 and "npu-acc16 overflows by construction" in warnings[0]


def test_the_shipped_narrow_config_cannot_overflow_8_bit_training():
    hw = fqtsim.load_hw(HW_DIR / "npu-acc24.yaml")
    worst = overflow.gemm_bound(hw, 10_000, 8, 8, "affine", "affine")   # both operands unsigned
    assert worst.accumulator[1] == 128 * 255 * 255 < 2 ** 23 and not worst.acc_overflows
    assert worst.k_max == (2 ** 31 - 1) // (255 * 255) == 33_025 and not worst.psum_overflows
    bounds = overflow.training_bounds(hw, mlp(), 100)
    assert not any(b.can_overflow for _, b in bounds) and overflow.summary(hw, bounds)[1] == []
    # ResNet-50's weight gradients sum 802,816 products: the 32-bit partial sums can overflow
    long = dict(overflow.training_bounds(hw, workload("resnet50"), 64))["grad_weight"]
    assert long.k == 64 * 112 * 112 and long.psum_overflows and not long.acc_overflows


def test_without_spills_the_accumulator_holds_the_whole_k():
    hw = fqtsim.load_hw(NPU)
    b = overflow.gemm_bound(hw, 66_312)
    assert b.psum_bits is None and b.run == 66_312 and b.k_max == 66_311 and b.acc_overflows
    assert not overflow.gemm_bound(hw, 66_311).can_overflow


def test_fqtsim_cost_states_the_bound_and_warns(capsys):
    hw_path = HW_DIR / "npu-acc24.yaml"
    assert main(["cost", "--hw", str(hw_path), "--gemm", "128x784x512"]) == 0
    out = capsys.readouterr().out
    assert "accumulator bound" in out and "over 128 products in the 24-bit accumulator" in out
    assert "warning" not in out and "energy figures, the 45nm table" in out


def test_fqtsim_cost_and_run_warn_on_a_config_that_overflows(tmp_path, capsys):
    path = acc16_yaml(tmp_path)
    assert main(["cost", "--hw", str(path), "--gemm", "64x784x64", "--quantizer", "psq"]) == 0
    assert "warning: npu-acc16 overflows by construction" in capsys.readouterr().out
    assert main(["run", "--hw", str(path), "--dataset", "synthetic", "--epochs", "1",
                 "--batch-size", "100", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accumulator bound of the training's GEMMs")
    assert out.count("warning: npu-acc16 overflows by construction") == 2   # before and after
    summary = pd.read_json(tmp_path / "run" / "summary.json", typ="series")
    assert summary["overflows"] > 0


def test_an_8_bit_fqt_run_on_the_narrow_config_trains(tmp_path, capsys):
    assert main(["run", "--hw", "npu-acc24", "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    summary = pd.read_json(tmp_path / "r" / "summary.json", typ="series")
    assert summary["overflows"] == 0 and summary["accuracy"] > 0.6   # chance: 10%
