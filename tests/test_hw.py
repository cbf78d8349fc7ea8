"""Hardware configs: the shipped ones load; every kind of bad file gets one clear ValueError."""
import pytest
import yaml

import fqtsim
from conftest import HW_DIR, SHIPPED, hw_dict, set_key


def test_at_least_four_configs_ship_and_load():
    assert {"npu", "npu-7nm", "npu-acc24", "dsp"} <= set(SHIPPED) and len(SHIPPED) >= 4
    for name in SHIPPED:
        hw = fqtsim.load_hw(HW_DIR / f"{name}.yaml")
        assert hw.name == name
        assert hw.tcm.size_bytes > 0 and hw.array.rows * hw.array.cols > 0


def test_config_is_immutable():
    hw = fqtsim.load_hw(HW_DIR / "npu.yaml")
    with pytest.raises(AttributeError):
        hw.accumulator.bits = 16


def test_acc24_config_spills_and_saturates():
    acc = fqtsim.load_hw(HW_DIR / "npu-acc24.yaml").accumulator
    assert (acc.bits, acc.overflow, acc.spill_every, acc.psum_bits) == (24, "saturate", 128, 32)


def write(tmp_path, data, text=None):
    path = tmp_path / "bad.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("key, value, expect", [
    ("array.operand_bits", 9, "2..8"),
    ("array.operand_bits", 1, "2..8"),
    ("accumulator.bits", 7, "8..64"),
    ("accumulator.bits", 65, "8..64"),
    ("accumulator.psum_bits", 128, "8..64"),
    ("accumulator.overflow", "clamp", "'wrap' or 'saturate'"),
    ("accumulator.spill_every", 0, "integer >= 1"),
    ("tcm.size_kib", 0, "> 0"),
    ("tcm.size_kib", -4, "> 0"),
    ("tcm.size_kib", float("inf"), "finite"),
    ("ddr.bytes_per_cycle", 0, "> 0"),
    ("tcm.read_bytes_per_cycle", "fast", "> 0"),
    ("array.rows", 16.5, "integer"),
    ("array.rows", True, "integer"),
    ("mapping.double_buffer", "yes", "true or false"),
    ("mapping.loop_order", ["k", "m"], "[n, m] or [m, n] (K innermost)"),
    ("mapping.loop_order", ["n", "m", "m"], "an order of all three loops"),
    ("mapping.objective", "speed", "energy, cycles or edp"),
    ("mapping.objective", None, "energy, cycles or edp"),
    ("vector.rng.cycles", 0, "> 0"),
    ("array", [16, 16], "mapping"),
    ("technology", "5nm", "null or one of 45nm, 7nm"),
    ("technology", 7, "null or one of 45nm, 7nm"),
    ("tcm.read_pj_per_byte", -1, "or null (from the table of the config's technology"),
    ("vector.add.pj", "cheap", "or null"),
    ("energy.static_mw", -3, "a finite number >= 0, at most 1e+06 (mW), or null"),
    ("ddr.kind", "lpddr4", "the 45nm table lists ddr"),
])
def test_bad_values_name_file_key_and_allowed(tmp_path, key, value, expect):
    d = hw_dict("npu")
    set_key(d, key, value)
    path = write(tmp_path, d)
    with pytest.raises(ValueError) as err:
        fqtsim.load_hw(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and expect in msg, msg


def test_missing_key(tmp_path):
    d = hw_dict("npu")
    del d["tcm"]["read_pj_per_byte"]
    with pytest.raises(ValueError, match=r"tcm\.read_pj_per_byte: missing; expected a finite number >= 0"):
        fqtsim.load_hw(write(tmp_path, d))


def test_unknown_key(tmp_path):
    d = hw_dict("npu")
    d["accumulator"]["width"] = 16
    with pytest.raises(ValueError, match=r"accumulator: unknown key 'width'; allowed keys: bits"):
        fqtsim.load_hw(write(tmp_path, d))


def test_psum_narrower_than_accumulator(tmp_path):
    d = hw_dict("npu-acc24")
    d["accumulator"]["psum_bits"] = 12
    with pytest.raises(ValueError, match="psum_bits >= bits"):
        fqtsim.load_hw(write(tmp_path, d))


@pytest.mark.parametrize("text, expect", [
    ("- just\n- a list\n", "top level: expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("", "top level: expected a mapping"),
])
def test_not_a_mapping_or_not_yaml(tmp_path, text, expect):
    with pytest.raises(ValueError, match=expect):
        fqtsim.load_hw(write(tmp_path, None, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read the hardware config"):
        fqtsim.load_hw(tmp_path / "nope.yaml")


def test_null_energies_need_a_technology_and_explicit_ones_do_not(tmp_path):
    d = hw_dict("npu")
    del d["technology"]
    with pytest.raises(ValueError, match=r"tcm\.read_pj_per_byte: null, but the config names no "
                                         r"technology; give a number, or technology: 45nm or 7nm"):
        fqtsim.load_hw(write(tmp_path, d))
    for key in ("tcm.read_pj_per_byte", "tcm.write_pj_per_byte", "ddr.read_pj_per_byte",
                "ddr.write_pj_per_byte", "energy.mult_8x8_pj", "energy.add_32_pj",
                *(f"vector.{op}.pj" for op in ("minmax", "add", "mul", "compare", "rng", "requant"))):
        set_key(d, key, 0.5)
    hw = fqtsim.load_hw(write(tmp_path, d))   # static_mw null: the estimate needs no table
    assert hw.technology is None and hw.derived == ("energy.static_mw",)
    assert hw.tcm.read_pj_per_byte == 0.5 and hw.energy.static_mw > 0


def test_ddr_kind_picks_the_tables_dram_and_is_refused_with_explicit_figures(tmp_path):
    d = hw_dict("npu-7nm")
    d["ddr"]["kind"] = "hbm2"
    assert fqtsim.load_hw(write(tmp_path, d)).ddr.read_pj_per_byte == 350 / 8
    d["ddr"]["read_pj_per_byte"] = d["ddr"]["write_pj_per_byte"] = 40
    with pytest.raises(ValueError, match="ddr.kind: got 'hbm2', but ddr.read_pj_per_byte and "
                                         "ddr.write_pj_per_byte are given"):
        fqtsim.load_hw(write(tmp_path, d))


def test_derived_fields_are_not_yaml_keys(tmp_path):
    d = hw_dict("npu")
    d["derived"] = ["tcm.read_pj_per_byte"]
    with pytest.raises(ValueError, match="top level: unknown key 'derived'"):
        fqtsim.load_hw(write(tmp_path, d))
    d = hw_dict("npu")
    d["tcm"]["operand_pj"] = [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="tcm: unknown key 'operand_pj'; allowed keys: size_kib, "
                                         "read_bytes_per_cycle, write_bytes_per_cycle, "
                                         "read_pj_per_byte, write_pj_per_byte, partitions$"):
        fqtsim.load_hw(write(tmp_path, d))
