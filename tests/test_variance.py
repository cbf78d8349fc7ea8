"""Gradient variance on the device: the exact expectation is what repeated passes measure, both
stay under the propagated bound, PTQ > PSQ > BHQ."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.cli import main
from fqtsim.analysis.variance import measure, run
from fqtsim.simulation.device import Device
from fqtsim.training import noise
from fqtsim.training.fqt import FQTConfig, Simulator, convert

NPU = str(HW_DIR / "npu.yaml")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_measured_variance_stays_under_the_bound(tmp_path, model):
    table = run(tmp_path / model, hw=NPU, model=model, dataset="digits", epochs=1, batch_size=32,
                batches=3, draws=8, bits=(3, 6), seed=0)
    assert (table.bound >= table.empirical).all(), table
    assert set(table.layer) == ({"1", "3", "5"} if model == "mlp" else {"0", "3", "7"})
    first = table[table.layer == table.layer.iloc[0]].set_index(["quantizer", "bits"])
    for bits in (3, 6):   # heavy-tailed per-sample gradients: per-sample ranges help
        assert first.loc[("ptq", bits), "empirical"] > first.loc[("psq", bits), "empirical"]
    # three fewer bits cost roughly 4^3 in variance (ranges shift a little between draws)
    ratio = first.loc[("psq", 3), "empirical"] / first.loc[("psq", 6), "empirical"]
    assert 20 < ratio < 200
    assert (tmp_path / model / "variance.png").stat().st_size > 0


def test_variance_cli_from_a_run(tmp_path, capsys):
    from fqtsim.training.train import RunConfig, train
    train(RunConfig(hw=NPU, mode="qat", dataset="synthetic", epochs=1, batch_size=100,
                    out=str(tmp_path / "r")), progress=False)
    assert main(["variance", "--hw", NPU, "--run", str(tmp_path / "r"), "--batch-size", "50",
                 "--batches", "3", "--draws", "4", "--bits", "4", "--quantizer", "bhq",
                 "--out", str(tmp_path / "v")]) == 0
    table = pd.read_csv(tmp_path / "v" / "variance.csv")
    assert list(table.columns[:4]) == ["model", "layer", "quantizer", "bits"]
    assert (table.quantizer == "bhq").all() and (table.bound >= table.empirical).all()
    with pytest.raises(SystemExit):
        main(["variance", "--run", str(tmp_path / "r"), "--batches", "1000", "--out", str(tmp_path / "w")])
    assert "need" in capsys.readouterr().err


def tiny(arch: str):
    """A small FQT model on the device and two batches: an MLP (closed form throughout), or a
    CNN with BatchNorm and a strided conv (Hutchinson probes below its top layer)."""
    torch.manual_seed(0)
    if arch == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                            nn.Linear(8, 4))
        x = torch.randn(32, 16)
    else:
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4),
                            nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
        x = torch.randn(16, 1, 4, 4)
    y = torch.randint(0, 4, (len(x),))
    sim = Simulator(Device(load_hw(NPU)), FQTConfig("qat"), seed=1)
    half = len(x) // 2
    return convert(net, sim), sim, [(x[:half], y[:half]), (x[half:], y[half:])]


@pytest.mark.parametrize("arch, quantizer, bits", [("mlp", "ptq", 3), ("mlp", "psq", 4),
                                                   ("mlp", "bhq", 4), ("cnn", "psq", 4),
                                                   ("cnn", "bhq", 4)])
def test_the_exact_variance_is_what_repeated_passes_measure(arch, quantizer, bits):
    net, sim, batches = tiny(arch)
    table = measure(net, sim, batches, (quantizer,), (bits,), draws=250, progress=False, seed=2)
    se = np.hypot(table.empirical_se, table.exact_se)   # of the difference of the two means
    assert (se < 0.05 * table.exact).all(), table       # tight enough to tell a wrong formula
    assert (abs(table.empirical - table.exact) < 4 * se).all(), table
    top = table.layer == table.layer.iloc[-1]           # its quantizer sees the loss's dY alone
    assert (table.exact_se[top] < 1e-9 * table.exact[top]).all()
    # bound / exact is the product of its steps, each of which can only loosen
    np.testing.assert_allclose(table.sr_factor * table.x_factor * table.norm_factor,
                               table.bound_over_exact, rtol=1e-9)
    assert (table[["sr_factor", "x_factor", "norm_factor"]] >= 1).all().all(), table
    np.testing.assert_allclose(table.norm_factor[top], 1.0, rtol=1e-12)


@pytest.mark.parametrize("quantizer", ["psq", "bhq"])
def test_hutchinson_probes_agree_with_the_closed_form(quantizer, monkeypatch):
    net, sim, batches = tiny("mlp")
    forward = noise.Forward(net)
    sim.config, sim.probe = FQTConfig("fqt", quantizer, 4), {}
    noise.weight_gradients(net, sim, *batches[0])
    model_layers = noise.layers(net)
    closed = noise.expected_variance(model_layers, sim.probe, forward, np.random.default_rng(0))
    monkeypatch.setattr(noise, "_per_sample", lambda *_: False)   # probe every map instead
    probed = [noise.expected_variance(model_layers, sim.probe, forward, np.random.default_rng(seed),
                                      probes=64) for seed in range(16)]
    for name, terms in closed.items():
        for quantity in ("exact", "worst", "spectral"):
            values = [getattr(p[name], quantity) for p in probed]
            want = getattr(terms, quantity)
            se = np.std(values, ddof=1) / math.sqrt(len(values))
            assert se < 0.05 * want and abs(np.mean(values) - want) <= 4 * se + 1e-12 * want, \
                (name, quantity, np.mean(values), want, se)


def test_models_whose_backward_it_cannot_follow_are_refused():
    net, _, _ = tiny("mlp")
    with pytest.raises(ValueError, match="follows an nn.Sequential"):
        noise.layers(nn.ModuleList(net))
    with pytest.raises(ValueError, match="no backward map for Dropout"):
        noise.layers(nn.Sequential(*net[:3], nn.Dropout(), *net[3:]))
    with pytest.raises(ValueError, match="no FQT layers"):
        noise.layers(nn.Sequential(nn.ReLU()))
