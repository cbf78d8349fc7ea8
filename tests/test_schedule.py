"""Quantized GEMMs on the device: integer path == fake-quant path, passes == closed form."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fqtsim.cost
from conftest import HW_DIR, SHIPPED
from fqtsim import load_hw
from fqtsim.simulation.device import Device
from fqtsim.quantizers import DelayedRange, quantize_activation, quantize_gradient, quantize_weight
from fqtsim.simulation.schedule import QuantScheme, bitonic_compares
from fqtsim.simulation.passes import bitonic_sort

KEY = ["event", "level"]
EMULATION_ONLY = ["overflow", "clip"]


def gradient(rng, m, k):
    return rng.standard_normal((m, k)) * np.exp(1.5 * rng.standard_normal((m, 1)))


def run(hw, scheme, m, n, k, bits, seed, per_channel=False):
    """Quantize a gradient (delayed: with a range from a previous step) and run dX = Q(dY) W."""
    rng = np.random.default_rng(seed)
    x = gradient(rng, m, k)
    bounds = {}
    if scheme.range_policy == "delayed":
        history = DelayedRange(history=4, margin=1.0)
        history.observe(-np.abs(x).max() * 0.9, np.abs(x).max() * 0.9)   # last step's, a bit smaller
        lo, hi = history.bounds()
        bounds = {"lo": lo, "hi": hi}
        if scheme.method == "bhq":
            bounds = {}  # its history is of the transformed rows; dynamic within this test
    q = quantize_gradient(x, scheme.method, bits, rng, **bounds)
    w = quantize_weight(rng.standard_normal((n, k)), per_channel=per_channel).T  # B: K x N
    dev = Device(hw)
    out = dev.matmul(q, w, scheme=scheme, name="g")
    return dev, q, w, out


cases = st.fixed_dictionaries({
    "m": st.integers(1, 160), "n": st.integers(1, 120), "k": st.integers(1, 400),
    "bits": st.integers(2, 8), "seed": st.integers(0, 2**16),
    "method": st.sampled_from(["ptq", "psq", "bhq"]),
    "range_policy": st.sampled_from(["dynamic", "delayed"]),
})


@pytest.mark.parametrize("name", SHIPPED)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(case=cases)
def test_passes_equal_closed_form_and_integer_path_equals_fake_quant(name, case):
    hw = load_hw(HW_DIR / f"{name}.yaml")
    scheme = QuantScheme(case.pop("method"), case.pop("range_policy"))
    m, n, k, bits = case["m"], case["n"], case["k"], case["bits"]
    dev, q, w, out = run(hw, scheme, **case, per_channel=True)
    emulated = dev.ledger[~dev.ledger.event.isin(EMULATION_ONLY)].set_index(KEY).sort_index()
    closed = fqtsim.cost.gemm(hw, m, n, k, a_bits=bits, b_bits=8, a_quant=scheme,
                              name="g").set_index(KEY).sort_index()
    assert list(emulated.index) == list(closed.index)
    assert (emulated["count"] == closed["count"]).all()
    assert (emulated["bytes"] == closed["bytes"]).all()
    np.testing.assert_allclose(emulated["energy_pj"], closed["energy_pj"], rtol=1e-12)
    np.testing.assert_allclose(emulated["cycles"], closed["cycles"], rtol=1e-12, atol=1e-9)
    # 8-bit codes x 8-bit weights over K <= 400 cannot leave 16 bits' worth of trouble on npu
    if dev.ledger.query("event == 'overflow'")["count"].sum() == 0:
        ref = q.dequantize() @ w.dequantize()
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))


def test_overflow_breaks_equality_only_when_it_happens(make_hw):
    hw = make_hw("npu", **{"accumulator.bits": 12, "accumulator.overflow": "saturate"})
    rng = np.random.default_rng(0)
    q = quantize_gradient(gradient(rng, 8, 300), "ptq", 8, rng)
    w = quantize_weight(rng.standard_normal((300, 5)))
    dev = Device(hw)
    out = dev.matmul(q, w, scheme=QuantScheme("ptq"))
    assert dev.ledger.query("event == 'overflow'")["count"].sum() > 0
    assert not np.allclose(out, q.dequantize() @ w.dequantize())


def test_delayed_range_clips_are_counted():
    hw = load_hw(HW_DIR / "npu.yaml")
    rng = np.random.default_rng(0)
    x = gradient(rng, 16, 32)
    q = quantize_gradient(x, "psq", 8, rng, lo=-1.0, hi=1.0)
    dev = Device(hw)
    dev.matmul(q, quantize_weight(rng.standard_normal((32, 4))), scheme=QuantScheme("psq", "delayed"))
    assert dev.ledger.query("event == 'clip'")["count"].sum() == np.count_nonzero(np.abs(x) > 1) > 0
    assert "wide_write" not in set(dev.ledger.event)   # fused: no accumulator-width write-back


def test_forward_gemm_with_static_codes():
    hw = load_hw(HW_DIR / "npu.yaml")
    rng = np.random.default_rng(0)
    x, w = np.maximum(rng.standard_normal((20, 30)), 0), rng.standard_normal((7, 30))
    qx, qw = quantize_activation(x), quantize_weight(w, per_channel=True)
    dev = Device(hw)
    out = dev.matmul(qx, qw.T)                      # Y = X W^T: B = W^T, per column
    np.testing.assert_allclose(out, qx.dequantize() @ qw.dequantize().T, rtol=1e-12, atol=1e-12)
    assert "wide_write" not in set(dev.ledger.event)   # static codes: no quantizer passes
    assert {"colsum", "zero_point"} <= set(dev.ledger.event)  # affine activations: offset fix-up


def test_scales_along_the_reduction_dimension_are_refused():
    rng = np.random.default_rng(0)
    dev = Device(load_hw(HW_DIR / "npu.yaml"))
    dy, x = gradient(rng, 16, 10), rng.standard_normal((16, 12))
    # weight-gradient GEMM dW = dY^T X sums over samples: per-sample scales cannot be factored out
    per_sample = quantize_gradient(dy, "psq", 8, rng).T
    with pytest.raises(ValueError, match="a: per-col scales vary along the GEMM's reduction"):
        dev.matmul(per_sample, quantize_activation(x))
    # per output channel weights on dX = dY W: W's rows are the reduction dimension there
    w = quantize_weight(rng.standard_normal((10, 12)), per_channel=True)
    with pytest.raises(ValueError, match="b: per-row scales vary"):
        dev.matmul(quantize_gradient(dy, "ptq", 8, rng), w)
    # per column of dY (per output feature) is fine there
    per_feature = quantize_gradient(dy.T, "psq", 8, rng)
    out = dev.matmul(per_feature, quantize_activation(x))
    np.testing.assert_allclose(out, per_feature.dequantize() @ quantize_activation(x).dequantize(),
                               rtol=1e-12, atol=1e-12)


def test_scheme_must_match_the_quantizer():
    rng = np.random.default_rng(0)
    dev = Device(load_hw(HW_DIR / "npu.yaml"))
    q = quantize_gradient(gradient(rng, 4, 6), "ptq", 8, rng)
    with pytest.raises(ValueError, match="scheme: bhq does not match"):
        dev.matmul(q, quantize_weight(rng.standard_normal((6, 3))), scheme=QuantScheme("bhq"))
    with pytest.raises(ValueError, match="quantizer: got 'zsq'"):
        QuantScheme("zsq")
    with pytest.raises(ValueError, match="range policy: got 'lazy'"):
        QuantScheme("ptq", "lazy")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000])
def test_bitonic_network_sorts_and_counts(n):
    keys = np.random.default_rng(n).standard_normal(n)
    order, compares = bitonic_sort(keys)
    np.testing.assert_array_equal(keys[order], np.sort(keys)[::-1])
    assert compares == bitonic_compares(n)


def test_dynamic_ranges_cost_more_than_delayed_and_bhq_most(make_hw):
    hw = load_hw(HW_DIR / "npu.yaml")
    m, k, n = 128, 784, 512
    total = {}
    for method in ("ptq", "psq", "bhq"):
        for policy in ("dynamic", "delayed"):
            led = fqtsim.cost.gemm(hw, m, n, k, a_bits=8, a_quant=QuantScheme(method, policy))
            total[method, policy] = led.energy_pj.sum()
    for method in ("ptq", "psq", "bhq"):
        assert total[method, "dynamic"] > total[method, "delayed"]
    assert total["bhq", "dynamic"] > total["psq", "dynamic"] >= total["ptq", "dynamic"]


def test_psq_rows_fit_on_chip_when_rows_finish_early(make_hw):
    # m outer: a PSQ band of 16-row tiles is complete early and fits TCM; PTQ's whole tensor does not
    hw = make_hw("npu", **{"mapping.loop_order": ["m", "n"], "mapping.tile_m": 16})
    m, k, n = 512, 512, 64
    psq = fqtsim.cost.gemm(hw, m, n, k, a_quant=QuantScheme("psq")).set_index(KEY)
    ptq = fqtsim.cost.gemm(hw, m, n, k, a_quant=QuantScheme("ptq")).set_index(KEY)
    assert ("wide_write", "tcm") in psq.index and ("wide_write", "ddr") in ptq.index


def test_delayed_range_history():
    h = DelayedRange(history=2, margin=1.5)
    assert h.bounds() is None
    h.observe(-1, 1)
    h.observe(-3, 2)
    assert h.bounds() == (-0.5 - 3.75, -0.5 + 3.75)
    h.observe(0, 1)   # the first observation drops out of a history of two
    assert h.bounds() == (-0.5 - 3.75, -0.5 + 3.75)
    h.observe(0, 1)
    assert h.bounds() == (0.5 - 0.75, 0.5 + 0.75)
    with pytest.raises(ValueError, match="history: got 0"):
        DelayedRange(history=0)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("method", ["ptq", "psq"])
def test_weight_gradient_gemm_shared_handoff_equals_closed_form(name, method):
    """dW = Q(dY)^T X with affine codes on both sides, the gradient already written wide by the
    dX quantizer (shared), and the output handed off at full width."""
    hw = load_hw(HW_DIR / f"{name}.yaml")
    rng = np.random.default_rng(7)
    dy, x = gradient(rng, 96, 40), np.maximum(rng.standard_normal((96, 50)), 0)
    qa = quantize_gradient(dy.T, method, 8, rng)          # per output feature: rows of dY^T
    qb = quantize_activation(x)
    scheme = QuantScheme(method, "dynamic", shared_at="ddr")
    dev = Device(hw)
    out = dev.matmul(qa, qb, scheme=scheme, writeback="handoff", name="g")
    if dev.ledger.query("event == 'overflow'")["count"].sum() == 0:   # 16-bit accumulators saturate
        np.testing.assert_allclose(out, qa.dequantize() @ qb.dequantize(), rtol=1e-11, atol=1e-9)
    emulated = dev.ledger[~dev.ledger.event.isin(EMULATION_ONLY)].set_index(KEY).sort_index()
    closed = fqtsim.cost.gemm(hw, 40, 50, 96, a_quant=scheme, b_offset=True, writeback="handoff",
                              name="g").set_index(KEY).sort_index()
    assert list(emulated.index) == list(closed.index)
    assert (emulated["count"] == closed["count"]).all() and (emulated["bytes"] == closed["bytes"]).all()
    np.testing.assert_allclose(emulated["cycles"], closed["cycles"], rtol=1e-12, atol=1e-9)
    events = set(emulated.index.get_level_values("event"))
    assert {"rowsum", "colsum"} <= events and not {"writeback", "wide_write"} & events


@pytest.mark.parametrize("overrides", [
    {"pipeline.range": "pass"},
    {"pipeline.wide_format": "bf16"},
    {"pipeline.range": "pass", "pipeline.wide_format": "fp32", "mapping.loop_order": ["m", "n"]},
])
@pytest.mark.parametrize("method", ["ptq", "psq", "bhq"])
@pytest.mark.parametrize("policy", ["dynamic", "delayed"])
def test_pipeline_options_keep_the_device_equal_to_the_closed_form(make_hw, overrides, method, policy):
    hw = make_hw("npu", **overrides)
    for m, n, k, seed in ((37, 21, 130, 1), (128, 64, 300, 2)):
        scheme = QuantScheme(method, policy)
        dev, q, w, out = run(hw, scheme, m, n, k, 8, seed, per_channel=True)
        emulated = dev.ledger[~dev.ledger.event.isin(EMULATION_ONLY)].set_index(KEY).sort_index()
        closed = fqtsim.cost.gemm(hw, m, n, k, a_quant=scheme, name="g").set_index(KEY).sort_index()
        assert list(emulated.index) == list(closed.index)
        assert (emulated["count"] == closed["count"]).all()
        assert (emulated["bytes"] == closed["bytes"]).all()
        np.testing.assert_allclose(emulated["energy_pj"], closed["energy_pj"], rtol=1e-12)


def _rows(ledger):
    return ledger.set_index(KEY)


def test_delayed_ranges_write_their_codes_and_cost_nothing_over_the_baseline():
    hw = load_hw(HW_DIR / "npu.yaml")
    m, k, n = 128, 784, 512
    for method in ("ptq", "psq"):
        r = _rows(fqtsim.cost.gemm(hw, m, n, k, a_bits=4, a_quant=QuantScheme(method, "delayed")))
        assert r.loc[("code_write", "ddr"), "count"] == m * k
        assert r.loc[("code_write", "ddr"), "bytes"] == m * k / 2      # 4-bit codes, two a byte
        assert r.loc[("requantize", "array"), "count"] == m * k + m * n   # A's (its producer), and the output's
        assert r.loc[("sr_rng", "array"), "count"] == m * k
    table = fqtsim.cost.overhead(hw, m, n, k, [QuantScheme(q, p) for q in ("ptq", "psq", "bhq")
                                               for p in ("dynamic", "delayed")]).set_index(["quantizer", "range"])
    assert table.loc[("ptq", "delayed"), "extra_energy_pj"] == 0
    assert table.loc[("psq", "delayed"), "extra_energy_pj"] == 0
    # dynamic: the wide write and the requantization pass's read, at DDR here; the code write is
    # the baseline's too
    wide = m * k * 4
    assert table.loc[("psq", "dynamic"), "extra_ddr_bytes"] == 2 * wide
    assert table.loc[("bhq", "delayed"), "extra_energy_pj"] > 0


def test_fused_ranges_need_no_read_of_the_wide_tensor(make_hw):
    m, k, n = 128, 784, 512
    fused = _rows(fqtsim.cost.gemm(load_hw(HW_DIR / "npu.yaml"), m, n, k, a_quant="psq"))
    apart = _rows(fqtsim.cost.gemm(make_hw("npu", **{"pipeline.range": "pass"}), m, n, k,
                                   a_quant="psq"))
    assert ("range_pass", "array") in fused.index and ("range_pass", "ddr") not in fused.index
    assert fused.loc[("range_pass", "array"), "count"] == m * k
    assert apart.loc[("range_pass", "ddr"), "bytes"] == m * k * 4
    assert fused.energy_pj.sum() < apart.energy_pj.sum()
    assert fused.loc[("range_pass", "array"), "cycles"] == 0     # comparators beside the writes


def test_a_bf16_wide_format_halves_the_wide_bytes_and_rounds_what_is_read(make_hw):
    from fqtsim.simulation.device import round_wide
    hw = make_hw("npu", **{"pipeline.wide_format": "bf16"})
    m, k, n = 64, 96, 40
    wide = _rows(fqtsim.cost.gemm(hw, m, n, k, a_quant="ptq"))
    raw = _rows(fqtsim.cost.gemm(load_hw(HW_DIR / "npu.yaml"), m, n, k, a_quant="ptq"))
    assert wide.loc[("wide_write", "tcm"), "bytes"] * 2 == raw.loc[("wide_write", "tcm"), "bytes"]
    assert wide.loc[("wide_scale", "array"), "count"] == m * k
    # a materialized output is stored rounded to bf16: 8 significant bits, one implicit
    rng = np.random.default_rng(3)
    q = quantize_gradient(gradient(rng, m, k), "ptq", 8, rng)
    w = quantize_weight(rng.standard_normal((n, k))).T
    out = Device(hw).matmul(q, w, writeback="materialized")
    exact = Device(load_hw(HW_DIR / "npu.yaml")).matmul(q, w, writeback="materialized")
    np.testing.assert_array_equal(out, round_wide("bf16", exact))
    assert 0 < np.abs(out / exact - 1).max() <= 2.0 ** -8    # half an ulp of 7 stored bits
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -2.5, 0.0])   # ties to even
    np.testing.assert_array_equal(round_wide("bf16", x), [1.0, 1 + 2.0 ** -6, -2.5, 0.0])


def test_weight_sums_come_from_the_update_not_every_gemm():
    hw = load_hw(HW_DIR / "npu.yaml")
    step = fqtsim.cost.training_step(hw, "mlp", 32, "psq")
    colsum = step[step.event == "colsum"]
    assert set(colsum.gemm) <= {"update", "grad_weight"}
    bias = step[step.event.isin(["bias_add", "bias_grad"])].groupby(["layer", "event"])["count"].sum()
    assert bias[("1", "bias_add")] == 32 * 128 and bias[("5", "bias_grad")] == 32 * 10
    # layer 1 (the first) keeps one set of sums for its forward GEMM, the others two
    upd = colsum[colsum.gemm == "update"].set_index("layer")["count"]
    assert upd["1"] == 64 * 128 and upd["3"] == 2 * 128 * 64 and upd["5"] == 2 * 64 * 10
    alone = _rows(fqtsim.cost.gemm(hw, 32, 64, 128, a_offset=True))
    assert alone.loc[("colsum", "vector"), "count"] == 128 * 64
    known = _rows(fqtsim.cost.gemm(hw, 32, 64, 128, a_offset=True, b_sums_known=True))
    assert ("colsum", "vector") not in known.index


def test_optimizer_state_stays_in_tcm_where_the_step_leaves_room(make_hw):
    hw = load_hw(HW_DIR / "npu.yaml")
    step = fqtsim.cost.training_step(hw, "mlp", 100, "psq")
    upd = step[(step.gemm == "update") & step.event.isin(["optimizer_read", "optimizer_write"])]
    params, biases = 64 * 128 + 128 * 64 + 64 * 10, 128 + 64 + 10
    state = upd[upd.level == "tcm"]
    # masters and momentum read and written, and the FP32 gradients (grad_weight's, and the
    # biases' column sums) in TCM
    assert state["bytes"].sum() == 2 * 2 * (params + biases) * 4 + (params + biases) * 4
    used, home = fqtsim.cost.state_home(hw, "mlp", 100, "psq")
    assert home == "tcm" and used.tcm.size_bytes == hw.tcm.size_bytes - 2 * (params + biases) * 4
    # the GEMMs were laid out in what the state leaves
    plans = fqtsim.cost.mappings(hw, "mlp", 100, "psq")
    assert (plans.tcm_bytes + plans.tcm_free <= used.tcm.size_bytes).all()
    # a TCM too small for it, and ResNet-50's 25 M parameters: DDR
    small = make_hw("npu", **{"tcm.size_kib": 64})
    assert fqtsim.cost.state_home(small, "mlp", 100, "psq")[1] == "ddr"
    assert fqtsim.cost.state_home(hw, "resnet50", 8, "psq")[1] == "ddr"
    tiny = fqtsim.cost.training_step(small, "mlp", 100, "psq")
    assert set(tiny.loc[tiny.event == "optimizer_write", "level"]) == {"ddr"}


def test_bhq_inverse_gathered_in_the_pipeline_or_materialized(make_hw):
    gather = load_hw(HW_DIR / "npu.yaml")
    apart = make_hw("npu", **{"pipeline.bhq_inverse": "materialize"})
    m, k, n = 96, 200, 48
    g = _rows(fqtsim.cost.gemm(gather, m, n, k, a_quant="bhq"))
    w = _rows(fqtsim.cost.gemm(apart, m, n, k, a_quant="bhq"))
    assert g.loc[("inverse_rows", "array"), "count"] == m * n
    assert not any(e in ("wide_output", "inverse_transform") for e, _ in g.index)
    assert ("writeback", "ddr") in g.index and g.loc[("writeback", "ddr"), "bytes"] == m * n
    assert any(e == "wide_output" for e, _ in w.index) and ("inverse_codes", "ddr") in w.index
    assert g.energy_pj.sum() < w.energy_pj.sum()
    plan = fqtsim.cost.gemm(gather, m, n, k, a_quant="bhq").attrs["mapping"]
    assert plan["tile_m"] >= m          # every block is whole in each output tile
    # the device gathers as the closed form does, block by block
    dev, q, wq, out = run(gather, QuantScheme("bhq"), m, n, k, 8, 5)
    emulated = dev.ledger[~dev.ledger.event.isin(EMULATION_ONLY)].set_index(KEY).sort_index()
    closed = fqtsim.cost.gemm(gather, m, n, k, a_quant="bhq", name="g").set_index(KEY).sort_index()
    assert list(emulated.index) == list(closed.index)
    assert (emulated["count"] == closed["count"]).all() and (emulated["bytes"] == closed["bytes"]).all()
    np.testing.assert_allclose(out, q.dequantize() @ wq.dequantize(), rtol=1e-9, atol=1e-9)
    # rows too many for one tile beside the others: T^-1 falls back to the wide output
    tight = make_hw("npu", **{"tcm.size_kib": 16})
    big = _rows(fqtsim.cost.gemm(tight, 4096, 64, 64, a_quant="bhq"))
    assert any(e == "wide_output" for e, _ in big.index)
