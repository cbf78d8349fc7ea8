"""The array's fill and drain per fold, and the vector unit overlapping the array
(`pipeline.overlap`): hand-checked counts, the device walk equal to the closed form."""
import numpy as np
import pandas as pd
import pytest

import fqtsim.cost
from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.hardware.mapping import _score
from fqtsim.simulation.device import Device
from fqtsim.simulation.ledger import static_pj
from fqtsim.simulation.overlap import hidden, overlapped
from fqtsim.training.train import RunConfig, train

FILL = 16 + 16 - 2   # npu.yaml's 16 x 16 array


def mac_cycles(ledger) -> float:
    return ledger.loc[ledger.event.str.startswith("mac_"), "cycles"].sum()


def walked(hw, m, n, k) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    device = Device(hw)
    device.gemm(rng.integers(-8, 8, (m, k), dtype=np.int8), rng.integers(-8, 8, (k, n), dtype=np.int8))
    return device.ledger


# (mapping, K's tiles) -> array cycles of a 100 x 300 x 70 GEMM: 7 x 5 folds in all
FOLDS = {
    # one fold per tile: its accumulators stay in the array over the three K tiles, one fill
    "one fold per tile, k tiled": ({"mapping.tile_m": 16, "mapping.tile_n": 16, "mapping.tile_k": 100},
                                   35 * (300 + FILL)),
    # 64 x 48 tiles of 4 x 3, 4 x 2, 3 x 3, 3 x 2 folds (35), whose sums are parked at each of
    # six K tiles: every fold restarts at every K tile
    "parked partial sums": ({"mapping.tile_m": 64, "mapping.tile_n": 48, "mapping.tile_k": 50},
                            35 * 300 + 35 * 6 * FILL),
    # K outermost: every visit of a tile restarts its folds, three visits
    "k outer": ({"mapping.loop_order": ["k", "m", "n"], "mapping.tile_k": 100},
                35 * 300 + 35 * 3 * FILL),
    # spills to the partial-sum buffer do not restart the fold
    "spill every 40": ({"accumulator.spill_every": 40, "mapping.tile_m": 16, "mapping.tile_n": 16},
                       35 * (300 + FILL)),
}


@pytest.mark.parametrize("case", FOLDS)
def test_each_fold_start_pays_fill_and_drain_on_device_and_in_closed_form(make_hw, case):
    overrides, expected = FOLDS[case]
    hw = make_hw("npu", **overrides)
    closed = fqtsim.cost.gemm(hw, 100, 70, 300)
    assert mac_cycles(closed) == expected
    device = walked(hw, 100, 70, 300)
    assert mac_cycles(device) == expected
    assert device.cycles.sum() == pytest.approx(closed.cycles.sum(), rel=1e-12)
    # the mapper's estimate counts the same array cycles (compute-bound by its estimate of DDR)
    mp = closed.attrs["mapping"]
    assert _score(hw, fqtsim.cost._tiling(mp), 100, 70, 300, 8, 8)[0] == expected


def test_a_partial_fold_pays_the_whole_arrays_fill_and_drain():
    hw = load_hw(HW_DIR / "npu.yaml")
    assert mac_cycles(fqtsim.cost.gemm(hw, 1, 1, 10)) == 10 + FILL
    assert mac_cycles(fqtsim.cost.gemm(hw, 17, 16, 10)) == 2 * (10 + FILL)


# --- overlap ---------------------------------------------------------------------------------

def ledger(rows) -> pd.DataFrame:
    return pd.DataFrame([(layer, gemm, event, level, 1, float(b), 7.0, float(cy))
                         for layer, gemm, event, level, b, cy in rows],
                        columns=["layer", "gemm", "event", "level", "count", "bytes", "energy_pj",
                                 "cycles"])


def step(mac, stall_ddr, load_a, passes):
    """Layer 1 below layer 2: layer 2's grad_weight (the window: its MACs, a DDR stall, A's loads,
    A's reads from TCM, a write-back to DDR) and layer 1's gradient passes; around them, rows
    that never hide (layer 2's own gradient, from the loss; the producer's wide_write; the
    update)."""
    return ledger([
        ("1", "output", "mac_8x8", "array", 0, 50),
        ("2", "output", "mac_8x8", "array", 0, 50),
        ("2", "grad_input", "requant_pass", "vector", 0, 80),   # the loss gradient's: no window
        ("2", "grad_input", "mac_8x8", "array", 0, 400),
        ("2", "grad_weight", "mac_8x8", "array", 0, mac),
        ("2", "grad_weight", "load_a", "ddr", load_a, 0),
        ("2", "grad_weight", "read_a", "tcm", 16000, 0),
        ("2", "grad_weight", "writeback", "ddr", 1600, 0),
        ("2", "grad_weight", "stall", "ddr", 0, stall_ddr),
        ("2", "update", "weight_update", "vector", 0, 60),
        ("1", "grad_input", "wide_write", "ddr", 8000, 500),
        *(("1", gemm, event, level, b, cy) for gemm, event, level, b, cy in passes),
        ("1", "grad_input", "static", "chip", 0, 0),   # leakage over its elapsed cycles
        ("1", "grad_weight", "mac_8x8", "array", 0, 300),
    ])


# requant_pass: 400 vector cycles, 8000 B from DDR (500 cycles at 16 B/cycle: 100 beyond the
# vector's); code_write: 2000 B to DDR, 125 cycles. Alone: P = 625 cycles, 625 of them on DDR.
DDR_PASSES = [("grad_input", "requant_pass", "vector", 0, 400),
              ("grad_input", "requant_pass", "ddr", 8000, 100),
              ("grad_input", "code_write", "ddr", 2000, 125)]


def test_overlap_hides_what_the_ddr_port_leaves_room_for(make_hw):
    hw = make_hw("npu", **{"pipeline.overlap": True})
    # window: 1000 compute cycles, no stall (E = 1000); its DDR traffic (4800 + 1600) / 16 = 400
    # cycles. Together they need max(E, P, (6400 + 10000) / 16 = 1025, TCM reads (17600 +
    # 10000) / 64, TCM writes (6400 + 10000) / 64) = 1025 cycles: 600 of the passes' hide
    before = step(1000, 0, 4800, DDR_PASSES)
    mine = (before.layer == "1") & (before.gemm == "grad_input")
    before.loc[before.event == "static", "energy_pj"] = static_pj(hw, before.cycles[mine].sum())
    after = overlapped(hw, before)
    assert hidden(hw, before) == {"2": 600.0}
    assert before.cycles.sum() - after.cycles.sum() == pytest.approx(600)
    passes = after[(after.layer == "1") & after.event.isin(["requant_pass", "code_write"])]
    np.testing.assert_allclose(passes.cycles, [400 * 0.04, 100 * 0.04, 125 * 0.04])   # 25 of 625 left
    untouched = ~after.index.isin(passes.index)
    assert (after.cycles[untouched] == before.cycles[untouched]).all()
    for column in ("count", "bytes"):
        assert (after[column] == before[column]).all()
    # dynamic energy stays; the leakage of layer 1's grad_input lasts 600 cycles less
    static = after.event == "static"
    assert (after.energy_pj[~static] == before.energy_pj[~static]).all()
    assert after.energy_pj[static].sum() == pytest.approx(static_pj(hw, 500 + 25))


def test_a_ddr_bound_gemm_hides_no_ddr_bound_pass_and_vector_work_only_under_compute(make_hw):
    hw = make_hw("npu", **{"pipeline.overlap": True})
    # window: 300 compute cycles, 800 on DDR (E = 1100 = (16000 + 1600) / 16: DDR-bound).
    # The passes' DDR time adds to the port's: together 1725 = E + P, nothing hides
    assert hidden(hw, step(300, 800, 16000, DDR_PASSES)) == {"2": 0.0}
    # 400 cycles of vector work in TCM (BatchNorm's backward sums, a 12,800 B range read: 200
    # cycles of its read port) fit the DDR-bound window, but only its 300 compute cycles take them
    tcm = [("between_grad", "bn_grad_sums", "vector", 0, 250),
           ("grad_input", "range_pass", "vector", 0, 150), ("grad_input", "range_pass", "tcm", 12800, 0)]
    before = step(300, 800, 16000, tcm)
    assert hidden(hw, before) == {"2": 300.0}
    assert before.cycles.sum() - overlapped(hw, before).cycles.sum() == pytest.approx(300)


def test_overlap_off_returns_the_ledger_as_it_is(make_hw):
    hw = load_hw(HW_DIR / "npu.yaml")
    assert hw.pipeline.overlap is False
    before = step(1000, 0, 4800, DDR_PASSES)
    assert overlapped(hw, before) is before
    on = make_hw("npu", **{"pipeline.overlap": False})
    pd.testing.assert_frame_equal(fqtsim.cost.training_step(on, "mlp", 64, "psq"),
                                  fqtsim.cost.training_step(hw, "mlp", 64, "psq"))


@pytest.mark.parametrize("quantizer", ["ptq", "psq", "bhq"])
@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_overlap_takes_out_exactly_what_it_hides_never_below_the_arrays_cycles(make_hw, model, quantizer):
    off = fqtsim.cost.training_step(make_hw("npu"), model, 32, quantizer)
    hw = make_hw("npu", **{"pipeline.overlap": True})
    on = fqtsim.cost.training_step(hw, model, 32, quantizer)
    assert list(on.columns) == list(off.columns)
    for column in ("layer", "gemm", "event", "level", "count", "bytes"):
        assert (on[column] == off[column]).all(), column
    hides = hidden(hw, off)
    assert sum(hides.values()) > 0
    assert off.cycles.sum() - on.cycles.sum() == pytest.approx(sum(hides.values()), rel=1e-9)
    # dynamic energy unchanged, leakage shorter by what hid
    static = on.event == "static"
    assert (on.energy_pj[~static] == off.energy_pj[~static]).all()
    assert off.energy_pj.sum() - on.energy_pj.sum() == \
        pytest.approx(static_pj(hw, sum(hides.values())), rel=1e-9)
    assert (on.cycles >= 0).all() and (on.cycles <= off.cycles).all()
    for layer, hide in hides.items():   # no more than the window's own compute
        window = off[(off.layer == layer) & (off.gemm == "grad_weight")]
        assert hide <= mac_cycles(window)
    assert on.cycles.sum() >= mac_cycles(on)
    # only the backward's vector work moved: the ops between the GEMMs and the quantizer's passes
    moved = on[on.cycles != off.cycles]
    passes = {"range_pass", "sort", "transform", "requant_pass", "code_write", "inverse_transform"}
    assert set(moved.gemm) <= {"grad_input", "grad_weight", "between_grad"}
    assert set(moved.event[moved.gemm != "between_grad"]) <= passes
    assert set(moved.level) <= {"vector", "tcm", "ddr"}


def test_a_training_step_with_overlap_on_the_device_equals_the_closed_form(tmp_path, make_hw):
    hw = make_hw("npu", **{"pipeline.overlap": True})
    train(RunConfig(hw=str(tmp_path / "npu-variant.yaml"), model="mlp", dataset="synthetic",
                    quantizer="psq", epochs=1, batch_size=100, out=str(tmp_path / "r")), progress=False)
    run = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    device = run[(run.step == 3) & ~run.event.isin(["overflow", "clip"])]
    from fqtsim.simulation import workloads
    closed = fqtsim.cost.training_step(hw, workloads.mlp(), 100, "psq")
    key = ["layer", "gemm", "event", "level"]
    device, closed = device.set_index(key).sort_index(), closed.set_index(key).sort_index()
    assert list(device.index) == list(closed.index)
    np.testing.assert_allclose(device["energy_pj"], closed["energy_pj"], rtol=1e-9)
    np.testing.assert_allclose(device["cycles"], closed["cycles"], rtol=1e-9, atol=1e-6)
    off = fqtsim.cost.training_step(load_hw(HW_DIR / "npu.yaml"), workloads.mlp(), 100, "psq")
    assert closed.cycles.sum() < off.cycles.sum()
