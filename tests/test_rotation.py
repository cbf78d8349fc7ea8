"""hadamard: random Hadamard rotations along K, cancelled inside the GEMM, and their costs."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

import fqtsim
import fqtsim.cost
from fqtsim.quantizers import fake_quantize, quantize_gradient, quantize_weight, rotate_weight
from fqtsim.quantizers.rotation import random_rotation, rotation_adds, segments
from fqtsim.simulation import workloads
from fqtsim.simulation.device import Device
from fqtsim.simulation.schedule import QuantScheme
from fqtsim.training.train import RunConfig, train
from ledgers import step_equals
from test_train import NPU


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 200), block=st.sampled_from([2, 16, 32, 64]), seed=st.integers(0, 2**32 - 1))
def test_the_rotation_is_orthogonal_and_cancels_inside_the_product(k, block, seed):
    rng = np.random.default_rng(seed)
    r = random_rotation(k, block, rng)
    cuts = segments(k, block)
    assert sum(size for _, size in cuts) == k and all(s & (s - 1) == 0 and s <= block for _, s in cuts)
    x, w = rng.standard_normal((3, k)), rng.standard_normal((k, 4))
    matrix = r.columns(np.eye(k))
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(r.columns(x) @ r.rows(w), x @ w, atol=1e-12)
    np.testing.assert_allclose(r.uncolumns(r.columns(x)), x, atol=1e-12)
    assert r.adds == rotation_adds(k, block) == sum(s * int(np.log2(s)) for _, s in cuts)


def test_rotation_spreads_a_rows_outlier_before_it_is_ranged():
    """A column of outliers takes most of PSQ's per-row range; rotated, it is shared by its
    block, and the rows' quantization variance drops."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128))
    x[:, 5] *= 50
    errors = {m: np.mean([((fake_quantize(x, m, 4, np.random.default_rng(s)) - x) ** 2).sum()
                          for s in range(20)]) for m in ("psq", "hadamard")}
    assert errors["hadamard"] < errors["psq"] / 4


def test_the_device_runs_a_rotated_gemm_as_the_product_of_the_originals():
    rng = np.random.default_rng(1)
    dy, w = rng.standard_normal((32, 48)), rng.standard_normal((48, 20))
    a = quantize_gradient(dy, "hadamard", 8, rng)
    b = rotate_weight(w, a.rotation)
    out = Device(fqtsim.load_hw(NPU)).matmul(a, b, scheme=QuantScheme("hadamard"), b_sums_known=True)
    np.testing.assert_allclose(out, a.dequantize() @ b.dequantize(), rtol=1e-10, atol=1e-10)
    assert np.abs(out - dy @ w).max() < 0.05 * np.abs(dy @ w).max()
    plain = quantize_weight(w)
    with pytest.raises(ValueError, match="same R"):
        Device(fqtsim.load_hw(NPU)).matmul(a, plain, scheme=QuantScheme("hadamard"))


def test_bad_hadamard_input_is_refused():
    with pytest.raises(ValueError, match="takes dynamic, delayed"):
        QuantScheme("hadamard", "predicted")
    with pytest.raises(ValueError, match="Rotation"):
        quantize_gradient(np.ones((2, 8)), "hadamard", 4, rotation=random_rotation(
            4, 32, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="products of two activations"):
        fqtsim.cost.training_step(fqtsim.load_hw(NPU), "gpt", 2, "hadamard")


def test_dynamic_hadamard_rotates_in_its_requantization_pass_and_delayed_in_the_pipeline():
    hw = fqtsim.load_hw(NPU)
    for policy, level in (("dynamic", "vector"), ("delayed", "array")):
        ledger = fqtsim.cost.gemm(hw, 64, 96, 128, a_bits=4, writeback="handoff",
                                  a_quant=QuantScheme("hadamard", policy))
        rotate = ledger[ledger.event == "rotate"]
        assert list(rotate.level) == [level] and rotate["count"].sum() == 64 * 128 * 5


@pytest.mark.parametrize("model, policy", [("mlp", "dynamic"), ("cnn", "delayed")])
def test_a_hadamard_run_equals_its_closed_form_step_by_step(tmp_path, model, policy):
    train(RunConfig(hw=NPU, model=model, dataset="synthetic", quantizer="hadamard", grad_bits=4,
                    range_policy=policy, epochs=1, batch_size=100, out=str(tmp_path / "r")),
          progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    closed = fqtsim.cost.training_step(fqtsim.load_hw(NPU), layers, 100, "hadamard", policy, 4)
    step_equals(ledger, 3, closed)
    update = ledger[(ledger.step == 3) & (ledger.gemm == "update")]
    assert (update.event == "rotate").any()   # R^T W's codes, written by the update
