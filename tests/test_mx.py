"""mxint: block-scaled gradient codes, their GEMM on the device, and their costs."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

import fqtsim
import fqtsim.cost
from fqtsim.hardware.hw import with_block
from fqtsim.quantizers import quantize_gradient, quantize_weight, quantize_activation
from fqtsim.quantizers.mx import block_exponents
from fqtsim.simulation import workloads
from fqtsim.simulation.device import Device, block_exponents as scale_exponents
from fqtsim.simulation.schedule import QuantScheme
from fqtsim.training.train import RunConfig, train
from kernels import block_gemm
from reference import ref_block_gemm
from ledgers import step_equals
from test_train import NPU


def gradient(rng, m, k, sigma=2.0):
    return rng.standard_normal((m, k)) * np.exp(sigma * rng.standard_normal((m, 1)))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 100), bits=st.integers(2, 8),
       block=st.sampled_from([2, 8, 16, 32, 64]), seed=st.integers(0, 2**32 - 1))
def test_each_block_takes_the_least_exponent_that_holds_its_max(m, k, bits, block, seed):
    rng = np.random.default_rng(seed)
    x = gradient(rng, m, k)
    x[:, rng.integers(0, k)] = 0.0
    q = quantize_gradient(x, "mxint", bits, rng, block=block)
    top = (1 << (bits - 1)) - 1
    assert q.codes.dtype == np.int8 and np.abs(q.codes).max() <= top and q.clipped == 0
    assert q.scale.shape == (m, -(-k // block))
    peaks = np.array([[np.abs(row[j:j + block]).max() for j in range(0, k, block)] for row in x])
    assert (peaks <= top * q.scale).all()                    # nothing clipped
    live = peaks > 0
    assert (peaks[live] > top * q.scale[live] / 2).all()     # and no larger than needed
    np.testing.assert_array_equal(np.log2(q.scale), block_exponents(x, bits, block))


def test_a_zero_block_takes_its_rows_least_exponent_and_a_zero_row_zero():
    x = np.zeros((2, 96))
    x[0, :32] = 1.0
    x[0, 64:] = 1e-3
    q = quantize_gradient(x, "mxint", 8, np.random.default_rng(0))
    exps = np.log2(q.scale)
    assert exps[0, 1] == exps[0, 2] < exps[0, 0] and (exps[1] == 0).all()
    assert not q.dequantize()[1].any()


def test_bad_mx_input_is_refused():
    x = np.ones((2, 8))
    for block in (3, 1, 512, True):
        with pytest.raises(ValueError, match="block"):
            quantize_gradient(x, "mxint", 4, block=block)
    with pytest.raises(ValueError, match="no range"):
        quantize_gradient(x, "mxint", 4, lo=-1.0, hi=1.0)
    with pytest.raises(ValueError, match="NaN"):
        quantize_gradient(np.full((2, 8), np.nan), "mxint", 4)
    with pytest.raises(ValueError, match="predict"):
        QuantScheme("mxint", "predicted")
    with pytest.raises(ValueError, match="transpose"):
        quantize_gradient(x, "mxint", 4).T


@pytest.mark.parametrize("b_kind", ["weight", "activation"])
def test_the_device_computes_the_block_scaled_product_bit_exactly(b_kind):
    """dX = Q(dY) W (B symmetric) and dW = Q(dY^T) X (B affine: its offset times A's block-
    scaled row sums): the device's integer result is the kernel's, and equals the product of
    the dequantized operands where nothing overflows."""
    rng = np.random.default_rng(1)
    hw = fqtsim.load_hw(NPU)
    a = quantize_gradient(gradient(rng, 24, 80, 0.5), "mxint", 4, rng)
    b = quantize_weight(rng.standard_normal((80, 16))) if b_kind == "weight" else \
        quantize_activation(rng.standard_normal((80, 16)) + 0.5)
    device = Device(hw)
    out = device.matmul(a, b, scheme=QuantScheme("mxint"), writeback="materialized")
    c, _, _, counts = block_gemm(a.codes, scale_exponents(a), b.codes, block=32)
    want, _, _, overflows = ref_block_gemm(a.codes, scale_exponents(a), b.codes,
                                           np.zeros((3, 16), int), 32)
    np.testing.assert_array_equal(c, want)
    assert counts["overflows"] == overflows == 0
    np.testing.assert_allclose(out, a.dequantize() @ b.dequantize(), rtol=1e-12, atol=1e-12)
    assert (device.ledger.event == "block_align").any()


def test_a_device_refuses_blocks_its_shifters_do_not_take(make_hw):
    rng = np.random.default_rng(0)
    a = quantize_gradient(gradient(rng, 4, 64), "mxint", 8, rng, block=16)
    b = quantize_weight(rng.standard_normal((64, 8)))
    with pytest.raises(ValueError, match="blocks of 32"):
        Device(fqtsim.load_hw(NPU)).matmul(a, b, scheme=QuantScheme("mxint"))
    spilling = make_hw("npu-acc24")
    with pytest.raises(ValueError, match="spill_every"):
        fqtsim.cost.gemm(spilling, 64, 8, 64, a_bits=8, a_quant="mxint")
    with pytest.raises(ValueError, match="--block"):
        with_block(fqtsim.load_hw(NPU), 24)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_mxint_writes_no_wide_gradient_and_one_scale_byte_per_block(block):
    hw = with_block(fqtsim.load_hw(NPU), block)
    m, n, k = 128, 96, 256
    ledger = fqtsim.cost.gemm(hw, m, n, k, a_bits=4, writeback="handoff", a_quant="mxint")
    rows = ledger.set_index(["event", "level"])
    assert not (ledger.event == "wide_write").any()
    assert rows.loc[("scale_write", "ddr"), "bytes"] == m * k // block
    assert rows.loc[("block_align", "array"), "count"] == m * n * k // block
    assert rows.loc[("scale_load", "ddr"), "bytes"] == rows.loc[("load_a", "ddr"), "count"] / block
    dynamic = fqtsim.cost.gemm(hw, m, n, k, a_bits=4, writeback="handoff", a_quant="psq")
    moved = [g.loc[g.level.isin(["tcm", "ddr"]), "bytes"].sum() for g in (ledger, dynamic)]
    assert (dynamic.event == "wide_write").any() and moved[0] < moved[1]


@pytest.mark.parametrize("model, policy, block", [("mlp", "dynamic", 32), ("cnn", "delayed", 16)])
def test_an_mxint_run_equals_its_closed_form_step_by_step(tmp_path, model, policy, block):
    train(RunConfig(hw=NPU, model=model, dataset="synthetic", quantizer="mxint", grad_bits=4,
                    range_policy=policy, epochs=1, batch_size=100, block=block,
                    out=str(tmp_path / "r")), progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    hw = with_block(fqtsim.load_hw(NPU), block)
    step_equals(ledger, 3, fqtsim.cost.training_step(hw, layers, 100, "mxint", policy, 4))
    step = ledger[ledger.step == 3]
    assert not step[step.gemm.isin(["grad_input", "grad_weight"])].event.eq("wide_write").any()
