"""FQT layers and training runs: unbiased FQT gradients, conv as im2col, runs, files, errors."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.simulation.device import Device
from fqtsim.training.fqt import FQTConfig, Simulator, convert
from fqtsim.training.train import RunConfig, train
from ledgers import step_equals

NPU = str(HW_DIR / "npu.yaml")


def sim(mode="fqt", quantizer="psq", bits=8, policy="dynamic", seed=0, hw="npu"):
    return Simulator(Device(load_hw(HW_DIR / f"{hw}.yaml")), FQTConfig(mode, quantizer, bits, policy), seed)


def grads(model, x, y):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("quantizer", ["ptq", "psq", "bhq"])
@pytest.mark.parametrize("arch", ["linear", "conv"])
def test_fqt_gradient_is_an_unbiased_estimate_of_the_qat_gradient(quantizer, arch):
    torch.manual_seed(0)
    if arch == "linear":
        net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        x = torch.randn(24, 12)
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 5))
        x = torch.randn(6, 2, 5, 5)
    y = torch.randint(0, 5, (len(x),))
    qat = convert(net, sim("qat"))
    reference = grads(qat, x, y)
    fqt_sim = sim("fqt", quantizer, 4)
    for module in net.modules():
        if hasattr(module, "sim"):
            module.sim = fqt_sim
    draws = [grads(net, x, y) for _ in range(300)]
    for i, ref in enumerate(reference):
        stack = torch.stack([d[i] for d in draws]).double()
        mean, err = stack.mean(0), stack.std(0) / len(draws) ** 0.5
        # 4-bit stochastic gradients: the mean over 300 draws lies within 5 standard errors; an
        # element that rarely moves (its std badly estimated) within 3/300 of the largest spread
        spread = (stack.max(0).values - stack.min(0).values).max()
        bound = 5 * err + 3 / len(draws) * spread + 1e-6 * ref.abs().max()
        assert ((mean - ref.double()).abs() <= bound).all(), (i, (mean - ref).abs().max())


def test_conv_forward_is_im2col_of_the_quantized_operands():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    x = torch.relu(torch.randn(4, 3, 9, 7))
    reference_conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    reference_conv.load_state_dict(conv.state_dict())
    net = convert(nn.Sequential(conv), sim("qat"))
    out = net(x)
    # the same conv in float on the fake-quantized operands
    from fqtsim.quantizers import quantize_activation, quantize_weight
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    x_q = torch.from_numpy(quantize_activation(cols.double().numpy()).dequantize()).float()
    w_q = torch.from_numpy(quantize_weight(conv.weight.detach().double().numpy().reshape(5, -1)).dequantize()).float()
    expect = (x_q @ w_q.T).reshape(4, -1, 5).transpose(1, 2).reshape(4, 5, 5, 4) + conv.bias[None, :, None, None]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert out.shape == reference_conv(x).shape


def small(tmp_path, name, **kw):
    return RunConfig(hw=NPU, dataset="synthetic", epochs=1, batch_size=100, out=str(tmp_path / name), **kw)


def test_run_writes_summary_metrics_and_ledger(tmp_path):
    summary = train(small(tmp_path, "a", quantizer="bhq", grad_bits=5), progress=False)
    run = tmp_path / "a"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "ledger.csv", "mapping.csv",
                                                     "metrics.csv", "model.pt", "summary.json"]
    plans = pd.read_csv(run / "mapping.csv")   # the tiles the device used, as the cost model plans them
    ledger = pd.read_csv(run / "ledger.csv", dtype={"layer": str})
    assert set(zip(plans.layer.astype(str), plans.gemm)) == set(zip(ledger.layer, ledger.gemm)) - {
        (layer, g) for layer in ledger.layer for g in ("update", "between", "between_grad")}
    assert (plans.tcm_bytes + plans.tcm_free <= 256 * 1024).all() and set(plans.loop_order) == {"nm"}
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    for key in ("accuracy", "loss", "bytes_by_level", "energy_pj", "cycles", "overflows", "clips"):
        assert key in summary
    assert set(summary["bytes_by_level"]) == {"ddr", "tcm"} and summary["energy_pj"] > 0
    ledger = pd.read_csv(run / "ledger.csv")
    assert list(ledger.columns[:4]) == ["step", "layer", "gemm", "event"]
    assert set(ledger.gemm) == {"output", "grad_input", "grad_weight", "update", "between",
                                "between_grad"}   # the MLP's ReLUs and its softmax cross-entropy
    assert {"sort", "transform", "inverse_rows"} <= set(ledger.event)   # BHQ's passes, T^-1
    assert "wide_output" not in set(ledger.event)        # gathered: a batch of rows fits a tile
    assert len(pd.read_csv(run / "metrics.csv")) == summary["steps"] == 8
    config = json.loads((run / "config.json").read_text())
    assert config["quantizer"] == "bhq" and config["hw_config"]["accumulator"]["bits"] == 32


def test_same_seed_same_results(tmp_path):
    a = train(small(tmp_path, "a", model="cnn", range_policy="delayed"), progress=False)
    b = train(small(tmp_path, "b", model="cnn", range_policy="delayed"), progress=False)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert (tmp_path / "a" / "ledger.csv").read_bytes() == (tmp_path / "b" / "ledger.csv").read_bytes()
    assert a["ops"]["vector"] > 0


def test_modes_differ_in_what_runs_on_the_device(tmp_path):
    fp32 = train(small(tmp_path, "f", mode="fp32"), progress=False)
    qat = train(small(tmp_path, "q", mode="qat"), progress=False)
    fqt = train(small(tmp_path, "x", mode="fqt"), progress=False)
    assert fp32["energy_pj"] == 0 and 0 < qat["energy_pj"] < fqt["energy_pj"]
    # the forward GEMMs and the ops between them (ReLU, the loss's softmax)
    assert set(pd.read_csv(tmp_path / "q" / "ledger.csv").gemm) == {"output", "between"}


def test_narrow_accumulators_change_what_training_sees(tmp_path):
    wide = train(small(tmp_path, "w"), progress=False)
    narrow_yaml = tmp_path / "acc16.yaml"   # 16 bits, spilling every 16: 8-bit codes overflow it
    narrow_yaml.write_text((HW_DIR / "npu-acc24.yaml").read_text().replace("bits: 24 ", "bits: 16 ")
                           .replace("spill_every: 128 ", "spill_every: 16 "))
    narrow = train(RunConfig(hw=str(narrow_yaml), dataset="synthetic", epochs=1,
                             batch_size=100, out=str(tmp_path / "n")), progress=False)
    assert wide["overflows"] == 0 and narrow["overflows"] > 0
    assert narrow["loss"] != wide["loss"]


@pytest.mark.parametrize("field, value, expect", [
    ("quantizer", "zsq", "--quantizer: got 'zsq'; expected one of ptq, psq, bhq"),
    ("mode", "int8", "--mode: got 'int8'; expected one of fp32, qat, fqt"),
    ("model", "resnet", "--model: got 'resnet'"),
    ("dataset", "mnist", "--dataset: got 'mnist'"),
    ("grad_bits", 1, "--grad-bits: got 1"),
    ("epochs", 0, "--epochs: got 0"),
    ("batch_size", 0, "--batch-size: got 0"),
    ("track_variance", -1, "--track-variance: got -1"),
])
def test_bad_run_options(field, value, expect):
    with pytest.raises(ValueError, match=expect):
        RunConfig(**{field: value})


def test_cli_bad_input_exits_2_without_output(tmp_path):
    out = tmp_path / "never"
    for args in (["--quantizer", "zsq"], ["--hw", str(tmp_path / "missing.yaml")], ["--grad-bits", "9"]):
        done = subprocess.run([sys.executable, "-m", "fqtsim.cli", "run", "--out", str(out), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not out.exists()


def test_divergence_stops_with_message_and_keeps_files(tmp_path):
    out = tmp_path / "nan"
    done = subprocess.run([sys.executable, "-m", "fqtsim.cli", "run", "--dataset", "synthetic",
                           "--epochs", "1", "--lr", "1e9", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "NaN or Inf at step" in done.stderr and "Traceback" not in done.stderr
    assert (out / "metrics.csv").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("quantizer", ["ptq", "psq", "bhq"])
def test_a_training_step_on_the_device_equals_the_closed_form_step(tmp_path, model, quantizer):
    """The whole step (forward, both backward GEMMs, quantizer passes, update) of a real run equals
    fqtsim.cost.training_step for the model's layer shapes, event by event."""
    import fqtsim.cost
    from fqtsim.simulation import workloads

    # synthetic: 800 training samples, 8 batches of exactly 100
    train(RunConfig(hw=NPU, model=model, dataset="synthetic", quantizer=quantizer, epochs=1,
                    batch_size=100, out=str(tmp_path / "r")), progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    step_equals(ledger, 3, fqtsim.cost.training_step(load_hw(NPU), layers, 100, quantizer))
    step = ledger[(ledger.step == 3) & ~ledger.event.isin(["overflow", "clip"])]
    # the weight-gradient quantizer emits its codes from grad_input's quantizer's read of the
    # wide gradient: it moves no wide bytes of its own, and writes its codes
    for layer, group in step.groupby("layer"):
        written = group.query("gemm == 'grad_input' and event == 'wide_write'")
        dw = group.query("gemm == 'grad_weight'")
        if len(written):
            own = dw[dw.event.isin(["wide_write", "range_pass", "requant_pass"])
                     & dw.level.isin(["tcm", "ddr"])]
            assert own.empty, layer
            assert (dw.event == "code_write").any() and (dw.event == "requant_pass").any(), layer


def test_cli_rejects_an_out_path_that_is_a_file_and_a_narrow_mac_array(tmp_path, make_hw):
    out = tmp_path / "file"
    out.write_text("x")
    done = subprocess.run([sys.executable, "-m", "fqtsim.cli", "run", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr
    narrow = make_hw("npu", **{"array.operand_bits": 4})
    with pytest.raises(ValueError, match="MACs take operand codes of at most 4 bits"):
        train(RunConfig(hw=str(tmp_path / "npu-variant.yaml"), out=str(tmp_path / "never")),
              progress=False)
    assert narrow.array.operand_bits == 4 and not (tmp_path / "never").exists()



@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_delayed_run_starts_dynamic_and_each_step_equals_its_closed_form(tmp_path, model):
    """Before the range histories hold anything, every quantizer (and the tiling of each GEMM
    that hands it a tensor) is dynamic; from then on delayed."""
    import fqtsim.cost
    from fqtsim.simulation import workloads

    train(RunConfig(hw=NPU, model=model, dataset="synthetic", quantizer="psq",
                    range_policy="delayed", epochs=1, batch_size=100, out=str(tmp_path / "r")),
          progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    hw = load_hw(NPU)
    step_equals(ledger, 0, fqtsim.cost.training_step(hw, layers, 100, "psq", "dynamic"))
    step_equals(ledger, 3, fqtsim.cost.training_step(hw, layers, 100, "psq", "delayed"))


@pytest.mark.parametrize("model, quantizer", [("mlp", "psq"), ("cnn", "bhq"), ("mlp", "ptq")])
def test_a_predicted_run_fits_then_predicts_and_each_step_equals_its_closed_form(tmp_path, model,
                                                                                  quantizer):
    """grad_input's ranges are predicted per sample from the loss once two steps are fitted
    (the forward and Q_bw ranges come from history, as delayed); the step then costs what the
    closed form says, and the run reports how well the ranges were predicted."""
    import fqtsim.cost
    from fqtsim.simulation import workloads

    summary = train(RunConfig(hw=NPU, model=model, dataset="synthetic", quantizer=quantizer,
                              range_policy="predicted", epochs=1, batch_size=100,
                              out=str(tmp_path / "r")), progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    hw = load_hw(NPU)
    step_equals(ledger, 0, fqtsim.cost.training_step(hw, layers, 100, quantizer, "dynamic"))
    step_equals(ledger, 3, fqtsim.cost.training_step(hw, layers, 100, quantizer, "predicted"))
    assert (ledger[ledger.step == 3].event == "range_predict").any()
    assert not (ledger[(ledger.step == 3) & (ledger.gemm == "grad_input")].event == "wide_write").any() \
        or quantizer == "bhq"   # BHQ still writes dY wide to build its transform
    predictions = summary["range_predictions"]
    assert set(predictions) == {f"{name}.grad_input" for name in
                                ([layer.name for layer in layers][1:])}
    for report in predictions.values():
        assert 0 <= report["clip_rate"] < 0.05 and report["rms_log_error"] > 0


def test_the_state_home_is_decided_at_the_batches_the_run_takes(tmp_path):
    """--batch-size 96 splits 800 samples into 9 batches of 89 and 88: the device keeps the
    optimizer state where a step of 89 samples does."""
    import fqtsim.cost
    from fqtsim.simulation import workloads

    train(RunConfig(hw=NPU, model="cnn", dataset="synthetic", quantizer="psq", epochs=1,
                    batch_size=96, out=str(tmp_path / "r")), progress=False)
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    layers = workloads.cnn((1, 8, 8))
    step_equals(ledger, 0, fqtsim.cost.training_step(load_hw(NPU), layers, 89, "psq"))


def test_sgd_and_one_cycle_update_as_torchs_do_bit_for_bit():
    """fqtsim's optimizer and schedule (torch.optim is not imported: its first use loads the
    compiler stack) take the same steps as torch.optim.SGD under OneCycleLR's defaults."""
    import torch
    from fqtsim.training.optim import SGD, OneCycle

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    sgd = SGD(ours, lr=0.05, momentum=0.9, weight_decay=1e-4)
    cycle = OneCycle(sgd, 0.05, total_steps=37)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, weight_decay=1e-4)
    ref_cycle = torch.optim.lr_scheduler.OneCycleLR(ref, 0.05, total_steps=37)
    for step in range(37):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        sgd.step(), cycle.step(), ref.step(), ref_cycle.step()
        assert cycle.last_lr() == ref_cycle.get_last_lr()[0]
        assert sgd.momentum == ref.param_groups[0]["momentum"]
        if step == 20:   # a checkpoint taken here resumes to the same schedule
            again = OneCycle(SGD(ours, lr=0.05), 0.05, total_steps=37)
            again.load_state_dict(cycle.state_dict())
            assert again.optimizer.lr == sgd.lr
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    with pytest.raises(ValueError, match="rerun with --restart"):
        sgd.load_state_dict(ref.state_dict())   # a checkpoint from before


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits
    from fqtsim.training.data import _digits

    x, y = _digits()
    reference = load_digits()
    np.testing.assert_array_equal(x, reference.data)
    np.testing.assert_array_equal(y, reference.target)


def test_a_conv_input_is_quantized_once_as_a_map_and_unfolded_as_its_rows_would_be():
    """The hardware quantizes a conv's input map and builds the im2col rows from its codes: the
    codes equal those of quantizing the rows themselves (padding zeros coded as 0.0), and a
    delayed range's clips count each map element once, not once per window."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from fqtsim.quantizers import DelayedRange, quantize_activation
    from fqtsim.simulation.device import Device
    from fqtsim.hardware.conv import Im2col
    from fqtsim.training.fqt import FQTConfig, FQTConv2d, Simulator

    sim = Simulator(Device(load_hw(NPU)), FQTConfig("fqt", "psq", range_policy="delayed"))
    sim.bottom = "0"
    conv = FQTConv2d(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), sim, "3")
    rng = np.random.default_rng(0)
    for step, spread in enumerate((1.0, 1.5)):
        x = torch.from_numpy(rng.standard_normal((4, 3, 8, 8)) * spread + 0.5)
        conv.im2col = Im2col(4, 3, 8, 8, 3, 2, 1)
        rows = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(4 * 16, -1).numpy()
        fmap = x.numpy()
        q, scheme, naught = sim.quantize_input("3", fmap.reshape(-1, 8), zero=True)
        unfolded = conv.unfold_codes(q, naught)
        if step == 0:   # dynamic: the map's range, which holds 0.0 as the padding does
            ref = quantize_activation(rows)
            history = DelayedRange()
            history.observe(rows.min(), rows.max())
        else:           # delayed: the first step's range
            lo, hi = history.bounds()
            ref = quantize_activation(rows, lo=lo, hi=hi)
            assert scheme.range_policy == "delayed"
            assert q.clipped == np.count_nonzero((fmap < lo) | (fmap > hi)) > 0
            assert q.clipped < ref.clipped   # the rows repeat each element in several windows
        np.testing.assert_array_equal(unfolded.codes, ref.codes)
        assert unfolded.codes.dtype == ref.codes.dtype
        np.testing.assert_array_equal(unfolded.scale, ref.scale)
        np.testing.assert_array_equal(unfolded.offset, ref.offset)


def test_tracking_the_variance_ratio_changes_nothing_else_and_resumes_exactly(tmp_path, monkeypatch,
                                                                              stop_after_epoch):
    import fqtsim.training.train as t
    def config(name, track_variance=2):   # measured after epochs 1 and 3
        return RunConfig(hw=NPU, dataset="synthetic", epochs=3, batch_size=100, grad_bits=4,
                         quantizer="ptq", track_variance=track_variance, out=str(tmp_path / name))
    train(config("whole"), progress=False)
    train(config("plain", track_variance=0), progress=False)
    for name in ("ledger.csv", "model.pt"):   # the run itself is as it is untracked
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    metrics = pd.read_csv(tmp_path / "whole" / "metrics.csv")
    ratios = metrics.filter(like="variance_ratio.")
    assert list(ratios) == ["variance_ratio.1", "variance_ratio.3", "variance_ratio.5"]
    pd.testing.assert_frame_equal(metrics.drop(columns=list(ratios)),
                                  pd.read_csv(tmp_path / "plain" / "metrics.csv"))
    measured = ratios.notna().all(axis=1)
    last_steps = metrics.groupby("epoch").step.max()
    assert list(metrics.step[measured]) == list(last_steps[[0, 2]])
    assert (ratios[measured] > 0).all().all() and ratios[~measured].isna().all().all()

    stop_after_epoch(2)
    with pytest.raises(t.Interrupted):
        train(config("resumed"), progress=False)
    monkeypatch.undo()
    train(config("resumed"), progress=False)   # measures epoch 3 on resuming
    for name in ("ledger.csv", "metrics.csv", "model.pt"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(ValueError, match="only --mode fqt has"):
        RunConfig(mode="qat", track_variance=1)
    with pytest.raises(ValueError, match="needs two batches of 600"):
        train(RunConfig(hw=NPU, dataset="synthetic", batch_size=600, track_variance=1,
                        out=str(tmp_path / "big")), progress=False)
