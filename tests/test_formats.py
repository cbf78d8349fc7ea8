"""Stored formats of the weights and momentum: unbiased stochastic rounding, each step equal to a
slow reference update bit for bit, the device's update equal to the closed form for every
format, exact resume, and clear refusals of bad input."""
import itertools
import math
import struct

import numpy as np
import pandas as pd
import pytest
import torch

import fqtsim.cost
from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.analysis.report import COMPARED_FORMATS
from fqtsim.cli import main
from fqtsim.quantizers import quantize_activation, quantize_weight
from fqtsim.quantizers.storage import (MOMENTUM_FORMATS, WEIGHT_FORMATS, add, first,
                                       state_formats, store)
from fqtsim.simulation import workloads
from fqtsim.simulation.schedule import update_events
from fqtsim.training.optim import SGD
from fqtsim.training.train import RunConfig, train
from ledgers import step_equals

NPU = str(HW_DIR / "npu.yaml")


# --- a slow reference: Python floats, one value at a time ------------------------------------

def f32(x: float) -> float:
    """x rounded to fp32 (an fp32 op on fp32 operands, done in float64, rounds once here)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def ref_bf16(x: float, u: float | None) -> float:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    low = bits & 0xFFFF
    if u is None:
        up = low > 0x8000 or (low == 0x8000 and (bits >> 16) & 1)
    else:
        up = u * 65536 < low
    return struct.unpack("<f", struct.pack("<I", bits - low + (int(up) << 16)))[0]


def ref_round(y: float, u: float | None) -> int:
    if u is None:
        return round(y)   # ties to even
    lower = math.floor(y)
    return lower + (u < y - lower)


def ref_scale(peak: float) -> float:
    """The smallest power of two s with peak <= 127 s."""
    if peak == 0:
        return 1.0
    s = 1.0
    while 127 * s < peak:
        s *= 2
    while 127 * (s / 2) >= peak:
        s /= 2
    return s


def ref_store(name: str, values: list, shape: tuple, draw, block: int) -> list:
    """Values written in format `name` (`draw()`: the next uniform, None to round to nearest)."""
    if name == "fp32":
        return list(values)
    if name in ("bf16", "bf16-sr", "bf16-rn", "bf16-kahan"):
        return [ref_bf16(v, draw() if name == "bf16-sr" else None) for v in values]
    if name == "int16-sr":
        return [max(-32767, min(32767, ref_round(v * 2 ** 14, draw()))) * 2.0 ** -14
                for v in values]
    width = block if name == "int8" and len(shape) > 1 else \
        len(values) // shape[0] if len(shape) > 1 else len(values)
    out = []
    for start in range(0, len(values), width):
        group = values[start:start + width]
        s = ref_scale(max(abs(v) for v in group))
        out += [max(-127, min(127, ref_round(v / s, draw() if name != "int8-rn" else None))) * s
                for v in group]
    return out


def ref_steps(weights: str, momentum: str, params, grads, lr, mu, decay, seed, block):
    """Every stored weight and momentum value after each step of `grads`, as the device runs
    the update: momentum written first, then the weights, drawing uniforms in that order."""
    rng = np.random.default_rng(seed)
    sr = {"bf16-sr", "int16-sr", "int8-sr", "int8"}
    draws = lambda name: (lambda: rng.random()) if name in sr else (lambda: None)  # noqa: E731
    state = []
    for p in params:
        x = [float(v) for v in p.detach().numpy().ravel()]
        w = ref_store(weights, x, p.shape, lambda: None, block)
        c = [ref_bf16(f32(a - b), None) for a, b in zip(w, x)] if weights == "bf16-kahan" else None
        state.append([w, c, None])
    history = []
    for step in grads:
        for (w, c, m), g, p, entry in zip(state, step, params, state):
            g = [float(v) for v in g.numpy().ravel()]
            d = [f32(gi + f32(decay * wi)) for gi, wi in zip(g, w)]
            buf = d if m is None else [f32(f32(mu * mi) + di) for mi, di in zip(m, d)]
            entry[2] = ref_store(momentum, buf, p.shape, draws(momentum), block)
            update = [-f32(lr * b) for b in buf]
            if weights == "bf16-kahan":
                y = [f32(ui - ci) for ui, ci in zip(update, c)]
                s = [ref_bf16(f32(wi + yi), None) for wi, yi in zip(w, y)]
                entry[1] = [ref_bf16(f32(f32(si - wi) - yi), None) for si, wi, yi in zip(s, w, y)]
                entry[0] = s
            else:
                entry[0] = ref_store(weights, [f32(wi + ui) for wi, ui in zip(w, update)],
                                     p.shape, draws(weights), block)
        history.append([(list(w), None if c is None else list(c), list(m)) for w, c, m in state])
    return history


def bits_of(values) -> bytes:
    return np.asarray(values, dtype=np.float32).tobytes()


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("weights, momentum", list(itertools.product(WEIGHT_FORMATS,
                                                                      MOMENTUM_FORMATS)))
def test_each_step_stores_what_a_slow_reference_update_stores_bit_for_bit(weights, momentum):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.3 * torch.randn(5, 12)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(0.2 * torch.randn(4, 2, 3, 3))]
    start = [p.detach().clone() for p in params]
    grads = [[0.1 * torch.randn_like(p) for p in params] for _ in range(3)]
    lr, mu, decay, block = 0.05, 0.9, 1e-4, 4
    formats = state_formats(weights, momentum, block)
    sgd = SGD(params, lr=lr, momentum=mu, weight_decay=decay, formats=formats,
              rng=np.random.default_rng(7))
    expected = ref_steps(weights, momentum, [torch.nn.Parameter(s) for s in start], grads,
                         f32(lr), f32(mu), f32(decay), 7, block)
    for step, grad in enumerate(grads):
        for p, g in zip(params, grad):
            p.grad = g.clone()
        sgd.step()
        for i, p in enumerate(params):
            w, c, m = expected[step][i]
            if formats.masters:   # torch.optim.SGD's arithmetic (fused multiply-adds): close
                np.testing.assert_allclose(p.detach().numpy().ravel(), w, rtol=1e-6, atol=1e-7)
                continue
            assert bits_of(sgd.stored[i].values().ravel()) == bits_of(w), (step, i)
            assert bits_of(p.detach().numpy().ravel()) == bits_of(w)   # the model trains on it
            assert bits_of(sgd.buffers[i].values().ravel()) == bits_of(m), (step, i)
            if c is not None:
                assert bits_of(sgd.stored[i].compensation.ravel()) == bits_of(c)


@pytest.mark.parametrize("name, kind", [("bf16-sr", "weights"), ("int16-sr", "weights"),
                                        ("int8-sr", "weights"), ("int8", "momentum")])
def test_stochastic_rounding_of_the_update_is_unbiased(name, kind):
    rng = np.random.default_rng(3)
    draws, width = 4000, 16
    row = (rng.standard_normal(width) * np.exp(rng.standard_normal(width))).astype(np.float32)
    row[0] = 2.0 * np.abs(row).max()   # a peak that fixes each row's int8 scale
    x = np.tile(row * 0.1, (draws, 1))   # every row a copy: independent draws of the same write
    if kind == "weights":
        fmt = WEIGHT_FORMATS[name]
        stored = first(fmt, x)
        # updates of a fraction of a grid step, both signs; the peak's own stays put
        step = {"bf16-sr": np.abs(stored.values()) * 2.0 ** -8, "int16-sr": 2.0 ** -14,
                "int8-sr": np.abs(stored.values()).max() / 127}[name]
        update = (rng.uniform(-1.5, 1.5, width) * np.broadcast_to(step, x.shape)[0]).astype(np.float32)
        update[0] = 0.0
        update = np.tile(update, (draws, 1))
        target = stored.values() + update
        got = add(fmt, stored, update, rng).values()
    else:
        fmt = MOMENTUM_FORMATS[name]
        target = x
        got = store(fmt, x, rng, block=8).values()
    mean, std = got.mean(axis=0, dtype=np.float64), got.std(axis=0, dtype=np.float64)
    # each value's mean error in standard errors of the mean: |z| < 5 over 15 values fails by
    # chance with probability ~1e-5. Every value but the peak moves (a step's fraction away)
    stderr = std[1:] / np.sqrt(draws)
    assert (stderr > 0).all()
    z = np.abs(mean - target[0])[1:] / stderr
    assert z.max() < 5, z.max()


def test_round_to_nearest_loses_small_updates_and_kahan_keeps_them():
    x = np.full((1, 8), 1.0, dtype=np.float32)
    tiny = np.full((1, 8), 2.0 ** -10, dtype=np.float32)   # an eighth of bf16's ulp at 1.0
    rn, kahan = first(WEIGHT_FORMATS["bf16-rn"], x), first(WEIGHT_FORMATS["bf16-kahan"], x)
    i8 = first(WEIGHT_FORMATS["int8-rn"], np.array([[1.0, 0.5]], dtype=np.float32))
    for _ in range(64):
        rn = add(WEIGHT_FORMATS["bf16-rn"], rn, tiny, None)
        kahan = add(WEIGHT_FORMATS["bf16-kahan"], kahan, tiny, None)
        i8 = add(WEIGHT_FORMATS["int8-rn"], i8, np.array([[0.0, 2.0 ** -10]], np.float32), None)
    assert (rn.values() == 1.0).all()               # every update lost
    assert (kahan.values() == 1.0625).all()         # 64 / 1024, all kept
    assert i8.values()[0, 1] == 0.5                 # under half of int8's step: lost too


def test_update_events_follow_the_formats():
    hw = load_hw(NPU)
    p, n, b = 64 * 32, 32, 32
    fp32 = update_events(hw, p, "tcm", "ddr", sums=2, bias=b)
    # FP32 masters: 4-byte weights and momentum, one set of 8-bit codes, biases at full width
    assert fp32[("optimizer_read", "ddr")][:2] == [2 * (p + b), 8 * (p + b)]
    assert fp32[("optimizer_write", "ddr")][:2] == [2 * (p + b) + p + b, 8 * (p + b) + p + 4 * b]
    assert not any(event.startswith("state_") for event, _ in fp32)
    low = update_events(hw, p, "tcm", "ddr", sums=2, bias=b,
                        formats=state_formats("int8-sr", "int8", 16), channels=n)
    # int8 weights (a scale byte per channel; the bias one), int8 momentum (one per 16 values;
    # the bias's one block); the forward GEMM reads the stored codes, grad_input its own
    state = (p + n) + (p + p // 16) + (b + 1) + (b + 1)
    assert low[("optimizer_read", "ddr")][:2] == [2 * (p + b), state]
    assert low[("optimizer_write", "ddr")][:2] == [2 * (p + b) + p + b, state + p + b + 1]
    counts = {event: row[0] for (event, level), row in low.items() if level == "vector"}
    assert counts == {"weight_update": p + b, "state_decode": 2 * (p + b),
                      "state_peak": 2 * (p + b), "state_rng": 2 * (p + b),
                      "state_requant": (p + b) + p, "colsum": 2 * p}
    # in TCM the forward GEMM's codes are copied to DDR, where the GEMMs load them; the first
    # layer (no grad_input) has only that copy
    tcm = update_events(hw, p, "tcm", "tcm", sums=1, formats=state_formats("int8-sr"), channels=n)
    assert tcm[("optimizer_write", "ddr")][:2] == [p, p]
    kahan = update_events(hw, p, "tcm", "ddr", formats=state_formats("bf16-kahan", "bf16"))
    assert kahan[("optimizer_read", "ddr")][:2] == [3 * p, 4 * p + 2 * p]
    assert kahan[("kahan", "vector")][0] == p and kahan[("state_round", "vector")][0] == 3 * p


RUN_FORMATS = [pair for pair in COMPARED_FORMATS if pair != ("fp32", "fp32")]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("weights, momentum", RUN_FORMATS)
def test_a_step_on_the_device_equals_the_closed_form_step_for_every_format(
        tmp_path, model, weights, momentum):
    train(RunConfig(hw=NPU, model=model, dataset="synthetic", epochs=1, batch_size=100,
                    weights=weights, momentum=momentum, out=str(tmp_path / "r")), progress=False)
    layers = workloads.mlp() if model == "mlp" else workloads.cnn((1, 8, 8))
    closed = fqtsim.cost.training_step(load_hw(NPU), layers, 100, "psq", weights=weights,
                                       momentum=momentum)
    _equal_at_step(tmp_path / "r", 3, closed)
    assert {"state_decode", "state_round"} & set(closed.event)   # the format was charged


@pytest.mark.parametrize("weights, momentum", [("int8-sr", "int8"), ("fp32", "int8"),
                                               ("bf16-kahan", "bf16")])
def test_with_the_state_in_ddr_the_device_equals_the_closed_form(tmp_path, make_hw, weights,
                                                                 momentum):
    hw = make_hw("npu", **{"tcm.size_kib": 24})
    layers = workloads.mlp()
    assert fqtsim.cost.state_home(hw, layers, 100, weights=weights, momentum=momentum)[1] == "ddr"
    train(RunConfig(hw=str(tmp_path / "npu-variant.yaml"), dataset="synthetic", epochs=1,
                    batch_size=100, weights=weights, momentum=momentum, out=str(tmp_path / "r")),
          progress=False)
    closed = fqtsim.cost.training_step(hw, layers, 100, "psq", weights=weights, momentum=momentum)
    _equal_at_step(tmp_path / "r", 3, closed)


def _equal_at_step(run_dir, step, closed):
    step_equals(pd.read_csv(run_dir / "ledger.csv", dtype={"layer": str}), step, closed)


def test_low_precision_state_moves_fewer_bytes_and_can_live_in_tcm():
    hw = load_hw(NPU)
    table = fqtsim.cost.update_costs(hw, "resnet50", 8, [("fp32", "fp32"), ("bf16-sr", "bf16"),
                                                         ("int8-sr", "int8")])
    assert list(table.state_at) == ["ddr"] * 3
    assert table.state_MB.is_monotonic_decreasing and table.update_ddr_MB.is_monotonic_decreasing
    params = sum(layer.weights + layer.bias for layer in workloads.resnet(50))
    assert table.state_MB[0] * 1e6 == 8 * params
    # the MLP's state fits beside the GEMMs in every format
    small = fqtsim.cost.update_costs(hw, "mlp", 32, [("fp32", "fp32"), ("int8-sr", "int8")])
    assert list(small.state_at) == ["tcm", "tcm"]


def test_the_forward_gemm_reads_the_stored_int8_codes(tmp_path):
    from fqtsim.simulation.device import Device
    from fqtsim.training.fqt import FQTConfig, Simulator, convert

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 6))
    sgd = SGD(net.named_parameters(), lr=0.1, formats=state_formats("int8-sr"),
              rng=np.random.default_rng(0))
    sim = Simulator(Device(load_hw(NPU)), FQTConfig("qat"), stored_codes=sgd.codes)
    convert(net, sim)
    codes = sgd.codes(net[0].weight)
    assert codes.group == "rows" and codes.codes.dtype == np.int8
    np.testing.assert_array_equal(codes.dequantize(), net[0].weight.detach().numpy())
    x = torch.relu(torch.randn(4, 12))
    xq = quantize_activation(x.double().numpy())
    bias = net[0].bias.detach().double().numpy()
    expected = xq.dequantize() @ codes.dequantize().T + bias
    np.testing.assert_allclose(net(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    # not codes made again from the stored values (per tensor), which differ from them
    again = xq.dequantize() @ quantize_weight(codes.dequantize()).dequantize().T + bias
    assert np.abs(again - expected).max() > 1e-4


def test_a_stopped_run_with_low_precision_state_resumes_to_the_same_results(tmp_path, monkeypatch,
                                                                            stop_after_epoch):
    from fqtsim.training.train import Interrupted

    config = dict(hw=NPU, dataset="synthetic", epochs=2, batch_size=200, weights="int8-sr",
                  momentum="int8")
    whole = train(RunConfig(**config, out=str(tmp_path / "whole")), progress=False)
    stop_after_epoch(1)
    with pytest.raises(Interrupted):
        train(RunConfig(**config, out=str(tmp_path / "stopped")), progress=False)
    monkeypatch.undo()
    resumed = train(RunConfig(**config, out=str(tmp_path / "stopped")), progress=False)
    for name in ("ledger.csv", "metrics.csv", "model.pt"):
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert {**resumed, "seconds": 0} == {**whole, "seconds": 0}
    assert whole["weights"] == "int8-sr" and 0 < whole["update_energy_pj"] < whole["energy_pj"]


def test_bad_formats_and_blocks_are_refused_with_what_to_change(tmp_path, make_hw, capsys):
    with pytest.raises(ValueError, match="weights: got 'fp8'; expected one of fp32, bf16-sr"):
        fqtsim.cost.training_step(NPU, "mlp", 8, weights="fp8")
    with pytest.raises(ValueError, match="--momentum: got 'int4'; expected one of fp32, bf16, int8"):
        RunConfig(momentum="int4")
    # a block that does not divide a layer's weights: the layer named, a block that fits offered
    with pytest.raises(ValueError, match="layer 0's weights .144 values. are not a whole number "
                                         "of blocks of 64; .* e.g. 16"):
        fqtsim.cost.training_step(NPU, workloads.cnn((1, 8, 8)), 8, momentum="int8",
                                  momentum_block=64)
    with pytest.raises(ValueError, match="parameter 0.weight's weights .144 values."):
        SGD(torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3)).named_parameters(), lr=0.1,
            formats=state_formats(momentum="int8", momentum_block=64),
            rng=np.random.default_rng(0))
    with pytest.raises(SystemExit) as stop:
        main(["run", "--model", "cnn", "--dataset", "synthetic", "--momentum", "int8",
              "--momentum-block", "64", "--out", str(tmp_path / "never")])
    assert stop.value.code == 2 and "--momentum-block 64: layer 0's" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    # int8 weights are the forward GEMM's operand: an array of narrower codes cannot read them
    narrow = make_hw("npu", **{"array.operand_bits": 4})
    with pytest.raises(ValueError, match="weights int8-sr: the forward GEMM reads the stored "
                                         "8-bit codes as they are.*at most 4 bits"):
        fqtsim.cost.training_step(narrow, "mlp", 8, weights="int8-sr")
    with pytest.raises(ValueError, match="rng: bf16-sr weights"):
        SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, formats=state_formats("bf16-sr"))


def test_cost_prints_the_update_per_stored_format(tmp_path, capsys):
    csv = tmp_path / "formats.csv"
    assert main(["cost", "--model", "mlp", "--batch", "16", "--weights", "fp32", "int8-sr",
                 "--momentum", "fp32", "int8", "--csv", str(csv)]) == 0
    assert "per stored format of the weights and momentum" in capsys.readouterr().out
    table = pd.read_csv(csv)
    assert len(table) == 4 and set(table.weights) == {"fp32", "int8-sr"}
    assert (table["update_%"] > 0).all() and (table["update_%"] < 100).all()
