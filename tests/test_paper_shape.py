"""Issue 16 part 1's pieces: the eight-layer CNN (cnn8), the learning-rate schedules and the
paper's PTQ (its range stretched so that 0.0 is a code)."""
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.quantizers import quantize_gradient
from fqtsim.quantizers.affine import quantize_affine, zero_point_range
from fqtsim.simulation import workloads
from fqtsim.simulation.workloads import Op
from fqtsim.training.models import build
from fqtsim.training.optim import COSINE_FLOOR, SGD, CosineToFloor, schedule
from fqtsim.training.train import RunConfig, train
from ledgers import step_equals

NPU = str(HW_DIR / "npu.yaml")


# --- cnn8 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [(1, 8, 8), (1, 1, 40)])
def test_cnn8_workload_is_the_torch_model(image):
    model = build("cnn8", image, 10)
    layers = workloads.cnn8(image, 10)
    gemms = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [layer.name for layer in layers] == [name for name, _ in gemms]
    assert len(layers) == 8
    for layer, (_, m) in zip(layers, gemms):   # the GEMM shapes the weights imply
        assert layer.weights == m.weight.numel() and layer.n == m.weight.shape[0]
    ops = Counter(op.kind for layer in layers for op in layer.between)
    mods = Counter(type(m).__name__ for m in model.modules())
    assert ops == {"bn": mods["BatchNorm2d"], "relu": mods["ReLU"], "softmax_ce": 1}
    assert layers[-1].between == (Op("softmax_ce"),)
    features = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert features == [layer.n for layer in layers if Op("bn") in layer.between]
    x = torch.zeros(2, *image)
    assert model(x).shape == (2, 10)   # the Linear takes what the last conv leaves




@pytest.mark.parametrize("quantizer, ptq_range", [("bhq", "affine"), ("ptq", "paper")])
def test_a_cnn8_step_on_the_device_equals_the_closed_form_step(tmp_path, quantizer, ptq_range):
    """One FQT step of cnn8 costs what fqtsim.cost.training_step says, event by event; the
    paper's PTQ costs what fqtsim's PTQ costs (the same codes, scales and passes)."""
    import fqtsim.cost

    train(RunConfig(hw=NPU, model="cnn8", dataset="synthetic", quantizer=quantizer,
                    ptq_range=ptq_range, epochs=1, batch_size=200, out=str(tmp_path / "r")),
          progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    closed = fqtsim.cost.training_step(load_hw(NPU), workloads.cnn8((1, 8, 8)), 200, quantizer)
    step_equals(ledger, 2, closed)


# --- schedules -------------------------------------------------------------------------------

def _lrs(name: str, steps: int = 50) -> list[float]:
    sgd = SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    sched = schedule(name, sgd, 0.1, steps)
    lrs = [sched.last_lr()]
    for _ in range(steps):
        sched.step()
        lrs.append(sched.last_lr())
    return lrs[:steps]   # the lr of each step taken


def test_constant_and_cosine_schedules():
    assert _lrs("constant") == [0.1] * 50
    cosine = _lrs("cosine")
    assert cosine[0] == 0.1 and cosine[-1] == pytest.approx(COSINE_FLOOR * 0.1, rel=1e-12)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert cosine[25] == pytest.approx(0.1 * (1 + COSINE_FLOOR) / 2, rel=0.05)
    assert _lrs("onecycle")[0] == pytest.approx(0.1 / 25)   # today's default, unchanged
    with pytest.raises(ValueError, match="--schedule: got 'step'; expected one of onecycle, "
                                         "constant, cosine"):
        RunConfig(schedule="step")


def test_a_cosine_schedule_resumes_where_it_stopped():
    sgd = SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    sched = CosineToFloor(sgd, 0.1, 40, COSINE_FLOOR)
    for _ in range(17):
        sched.step()
    again = CosineToFloor(SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1), 0.1, 40, COSINE_FLOOR)
    again.load_state_dict(sched.state_dict())
    for _ in range(10):
        sched.step(), again.step()
        assert again.last_lr() == sched.last_lr()
    other = CosineToFloor(SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1), 0.1, 40, 1.0)
    with pytest.raises(ValueError, match="rerun with --restart"):
        other.load_state_dict(sched.state_dict())   # a constant run's checkpoint is not cosine's


def test_a_run_with_a_cosine_schedule_resumes_byte_for_byte(tmp_path, monkeypatch, stop_after_epoch):
    import fqtsim.training.train as t

    def config(name):
        return RunConfig(hw=NPU, dataset="synthetic", epochs=3, batch_size=200, grad_bits=4,
                         quantizer="ptq", ptq_range="paper", schedule="cosine",
                         out=str(tmp_path / name))
    train(config("whole"), progress=False)
    stop_after_epoch(1)
    with pytest.raises(t.Interrupted):
        train(config("resumed"), progress=False)
    monkeypatch.undo()
    train(config("resumed"), progress=False)
    for name in ("ledger.csv", "metrics.csv", "model.pt"):
        resumed, whole = (tmp_path / run / name for run in ("resumed", "whole"))
        assert resumed.read_bytes() == whole.read_bytes(), name
    lrs = pd.read_csv(tmp_path / "whole" / "metrics.csv").lr
    assert lrs.is_monotonic_decreasing and lrs.iloc[-1] == pytest.approx(0.05 * COSINE_FLOOR)


def test_new_options_at_their_defaults_keep_old_sweep_ids_and_run_dirs():
    from fqtsim.analysis.sweep import grid, point_id, resolved

    cfg = RunConfig()
    assert "schedule" not in resolved(cfg) and "ptq_range" not in resolved(cfg)
    assert str(cfg.run_dir) == "runs/npu-mlp-digits-fqt-psq8-seed0"
    paper = RunConfig(quantizer="ptq", ptq_range="paper", schedule="cosine")
    assert "-ptq8-dynamic-paper-cosine-" in point_id(paper)
    assert str(paper.run_dir).endswith("fqt-ptq8-cosine-paper-seed0")
    # a PTQ range is PTQ's: the other quantizers' points (and fp32, QAT) take the default
    points = grid(mode=["qat", "fqt"], quantizer=["ptq", "psq"], ptq_range=["affine", "paper"])
    assert sorted((p.mode, p.quantizer, p.ptq_range) for p in points) == [
        ("fqt", "psq", "affine"), ("fqt", "ptq", "affine"), ("fqt", "ptq", "paper"),
        ("qat", "psq", "affine")]
    with pytest.raises(ValueError, match="only for --mode fqt --quantizer ptq"):
        RunConfig(quantizer="psq", ptq_range="paper")
    with pytest.raises(ValueError, match="--ptq-range: got 'x'; expected one of affine, paper"):
        RunConfig(quantizer="ptq", ptq_range="x")


# --- the paper's PTQ -------------------------------------------------------------------------

CASES = {"mixed": lambda x: x, "positive": np.abs, "negative": lambda x: -np.abs(x)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", CASES)
def test_the_paper_ptq_quantizes_zero_exactly(bits, case):
    rng = np.random.default_rng(bits)
    x = CASES[case](rng.normal(0.3, 1.0, (64, 48))) * np.exp(rng.uniform(-20, 20))   # any size
    x[::3, ::5] = 0.0
    q = quantize_gradient(x, "ptq", bits, rng, zero_exact=True)
    zeros = x == 0.0
    assert (q.dequantize()[zeros] == 0.0).all()
    assert len(np.unique(q.codes[zeros])) == 1   # one code: the zero point
    assert q.clipped == 0
    # the stretched range covers the data and 0.0, and is no wider than one bin more needs
    span = np.ptp(np.append(x, 0.0))
    top = (1 << bits) - 1
    assert span * (1 - 1e-12) <= q.ranges[0, 0] <= span * top / (top - 1) * (1 + 1e-9) \
        or case != "mixed"
    assert q.ranges[0, 0] == pytest.approx(span, rel=1e-9) or case == "mixed"


def test_zero_point_range_takes_the_least_scale_that_covers_the_data():
    lo, hi, scale, zero = zero_point_range(np.array([[-1.0, 0.0, -2.0, 0.0]]),
                                           np.array([[3.0, 5.0, 0.0, 0.0]]), 15)
    np.testing.assert_array_equal(zero, [[4, 0, 15, 0]])   # -1..3: 0 near a quarter up
    np.testing.assert_allclose(scale, [[max(1 / 4, 3 / 11), 5 / 15, 2 / 15, 1.0]], rtol=1e-12)
    np.testing.assert_array_equal(lo, -zero * scale)
    assert (lo <= np.array([[-1.0, 0.0, -2.0, 0.0]])).all()
    assert (hi >= np.array([[3.0, 5.0, 0.0, 0.0]]) * (1 - 1e-15)).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_the_paper_ptq_is_unbiased_within_its_stretched_range(bits):
    rng = np.random.default_rng(7)
    x = rng.standard_t(3, (16, 24)) + 0.4
    draws = 4000
    mean = sum(quantize_gradient(x, "ptq", bits, rng, zero_exact=True).dequantize()
               for _ in range(draws)) / draws
    scale = quantize_gradient(x, "ptq", bits, rng, zero_exact=True).scale[0, 0]
    se = scale / 2 / np.sqrt(draws)   # stochastic rounding's error is at most scale / 2
    assert np.abs(mean - x).max() < 5 * se
    assert abs((mean - x).mean()) < 5 * se / np.sqrt(x.size)


def test_the_default_ptq_is_unchanged_and_zero_exact_is_ptqs_alone():
    """Without zero_exact, PTQ's codes, scale and offset are those of the data's own range."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.2, 1.0, (32, 20))
    for bits in (2, 4, 8):
        top, shift = (1 << bits) - 1, 1 << (bits - 1)
        q = quantize_gradient(x, "ptq", bits, np.random.default_rng(bits))
        u = np.random.default_rng(bits).random(x.shape)
        scale = (x.max() - x.min()) / top
        codes = np.clip(np.floor((x - x.min()) / scale + u), 0, top) - shift
        np.testing.assert_array_equal(q.codes, codes)
        assert q.scale[0, 0] == scale and q.offset[0, 0] == x.min() + scale * shift
        same = quantize_affine(x, bits, "tensor", stochastic=True, rng=np.random.default_rng(bits),
                               zero_exact=False)
        np.testing.assert_array_equal(same.codes, q.codes)
    with pytest.raises(ValueError, match="zero_exact: stretches PTQ's range"):
        quantize_gradient(x, "psq", 4, rng, zero_exact=True)
