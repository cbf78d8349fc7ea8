"""The transformer language model: its numerics, its device step against the closed form, its
corpus, its runs and GPT-2's cost-model shape."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

import fqtsim.cost
from conftest import HW_DIR
from fqtsim import load_hw
from fqtsim.hardware.mapping import loss_producer
from fqtsim.quantizers import Quantized, quantize_activation, quantize_gradient
from fqtsim.simulation import workloads
from fqtsim.simulation.device import Device
from fqtsim.simulation.schedule import QuantScheme
from fqtsim.simulation.workloads import GPTShape
from fqtsim.training import attention, corpus, data, fqt
from fqtsim.training.fqt import FQTConfig, Simulator, convert
from fqtsim.training.gpt import GPT
from fqtsim.training.train import STEP_COLUMNS, RunConfig, take_step, train

NPU = load_hw(HW_DIR / "npu.yaml")
TINY = GPTShape(vocab=96, context=8, width=16, heads=2, blocks=1)
KEY = ["layer", "gemm", "event", "level"]


def tiny_run(mode="fqt", quantizer="psq", policy="dynamic", batch=3, steps=1, seed=0):
    """A tiny GPT converted onto the device as a run sets it up; `steps` training steps on
    random tokens. Returns (model, simulator, the last step's ledger rows)."""
    layers = workloads.gpt(TINY)
    hw, home = fqtsim.cost.state_home(NPU, layers, batch, quantizer, policy)
    torch.manual_seed(seed)
    model = GPT(TINY)
    sim = Simulator(Device(hw), FQTConfig(mode, quantizer, 8, policy), seed=seed, state_at=home,
                    layers=layers)
    convert(model, sim)
    x, y = torch.randint(0, TINY.vocab, (2, batch, TINY.context))
    rows = []
    for step in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        rows = take_step(sim.device, step)
    return model, sim, rows


def test_the_converted_modules_are_the_workloads_layers_in_order():
    model, sim, _ = tiny_run(steps=0)
    layers = workloads.gpt(TINY)
    assert sim.order == [layer.name for layer in layers]
    assert sim.bottom == "embed" and sim.top == "head"
    ops = [op.kind for layer in layers for op in layer.between]
    modules = [type(m).__name__ for m in model.modules()]
    assert ops.count("layernorm") == modules.count("LayerNorm") == 2 * TINY.blocks + 1
    assert ops.count("gelu") == modules.count("GELU") and ops.count("softmax") == TINY.blocks
    assert ops.count("add") == 2 * TINY.blocks + 1   # the residuals, and the position embedding


@pytest.mark.parametrize("quantizer, policy", [("ptq", "dynamic"), ("psq", "dynamic"),
                                               ("bhq", "dynamic"), ("psq", "delayed"),
                                               ("mxint", "dynamic")])
def test_a_transformer_step_on_the_device_equals_the_closed_form(quantizer, policy):
    """Every GEMM (the products of two activations batched per sequence and head), quantizer
    pass, op between them, embedding event and update, event by event; delayed ranges from the
    second step on."""
    _, _, rows = tiny_run(quantizer=quantizer, policy=policy, steps=2)
    got = pd.DataFrame(rows, columns=STEP_COLUMNS)
    got = got[~got.event.isin(["overflow", "clip"])].set_index(KEY).sort_index()
    closed = fqtsim.cost.training_step(NPU, workloads.gpt(TINY), 3, quantizer, policy)
    closed = closed.set_index(KEY).sort_index()
    assert list(got.index) == list(closed.index)
    assert (got["count"].values == closed["count"].values).all()
    for column in ("bytes", "energy_pj", "cycles"):
        np.testing.assert_allclose(got[column], closed[column], rtol=1e-9, atol=1e-6)
    gemms = set(zip(got.reset_index().layer, got.reset_index().gemm))
    for product in ("h.0.scores", "h.0.context"):   # both activations quantized, both backward GEMMs
        assert {(product, g) for g in ("output", "grad_input", "grad_weight")} <= gemms
        assert (product, "update") not in gemms
    assert {("embed", g) for g in ("output", "grad_weight", "update", "between")} <= gemms


def _identity(x, *args, **kwargs):
    """`x` as 'codes' that dequantize to itself: nothing quantized."""
    x = np.asarray(x, np.float64)
    return Quantized(x, np.ones((x.shape[0], 1)), np.zeros((x.shape[0], 1)), 8, "tensor")


def _exact(self, a, b, **kwargs):
    self.last_handoff = loss_producer(self.hw)   # where the next quantizer would find it
    return a.dequantize() @ b.dequantize()


def test_an_fqt_transformer_with_nothing_quantized_equals_the_float_one(monkeypatch):
    """With identity quantizers and exact products, the FQT model (its Linears, attention
    products and embeddings on the device's path) computes the float model's logits and
    gradients: the wiring of every operand, transpose and head is right."""
    for module, names in ((fqt, ("quantize_activation", "quantize_gradient", "quantize_weight")),
                          (attention, ("quantize_affine", "quantize_gradient"))):
        for name in names:
            monkeypatch.setattr(module, name, _identity)
    monkeypatch.setattr(Device, "matmul", _exact)
    monkeypatch.setattr(Device, "matmul_batch", lambda self, a, b, **kw: np.stack(
        [_exact(self, x, w) for x, w in zip(a, b)]))
    torch.manual_seed(0)
    float_model = GPT(TINY)
    fqt_model = convert(copy.deepcopy(float_model), Simulator(
        Device(NPU), FQTConfig("fqt", "psq"), layers=workloads.gpt(TINY)))
    x, y = torch.randint(0, TINY.vocab, (2, 4, TINY.context))
    for model in (float_model, fqt_model):
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    torch.testing.assert_close(fqt_model(x), float_model(x), rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in float_model.named_parameters()}
    for name, p in fqt_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(grads) == len(list(fqt_model.parameters()))


def test_batched_products_equal_one_gemm_at_a_time(make_hw):
    """Device.matmul_batch: the results of matmul pair by pair, and their rows summed; on an
    accumulator that can overflow, the kernel's emulation pair by pair."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 16))
    b = [quantize_activation(rng.standard_normal((16, 8))) for _ in range(3)]
    cases = {"psq": [quantize_gradient(m, "psq", 4, rng) for m in x],
             "bhq": [quantize_gradient(m, "bhq", 4, rng) for m in x],   # passes per pair
             QuantScheme("psq", "delayed"): [quantize_gradient(m, "psq", 4, rng, lo=-1, hi=1)
                                             for m in x]}                 # clips per pair
    assert sum(q.clipped for q in cases[QuantScheme("psq", "delayed")]) > 0
    for hw in (NPU, make_hw("npu", **{"accumulator.bits": 12})):
        for scheme, a in cases.items():
            one, batch = Device(hw), Device(hw)
            single = np.stack([one.matmul(q, w, scheme=scheme, name="g") for q, w in zip(a, b)])
            np.testing.assert_array_equal(batch.matmul_batch(a, b, scheme=scheme, name="g"), single)
            summed = one.ledger.groupby(["event", "level"], sort=False)[["count", "bytes"]].sum()
            merged = batch.ledger.set_index(["event", "level"])[["count", "bytes"]]
            pd.testing.assert_frame_equal(merged, summed)
    with pytest.raises(ValueError, match="one shape"):
        Device(NPU).matmul_batch(a[:2], [b[0], b[1].T])


def test_a_per_sample_layer_runs_one_gemm_per_sample_and_head():
    scores = next(l for l in workloads.gpt(TINY) if l.name == "h.0.scores")
    assert scores.gemms(5) == (TINY.context, 5 * TINY.heads)
    assert scores.group_rows == 1 and scores.b_source == "h.0.qkv"
    step = fqtsim.cost.training_step(NPU, [*workloads.gpt(TINY)], 5)
    macs = step[step.event == "mac_8x8"].groupby(["layer", "gemm"])["count"].sum()
    d = TINY.width // TINY.heads
    for gemm in ("output", "grad_input", "grad_weight"):   # T x d x T per sequence and head
        assert macs["h.0.scores", gemm] == 5 * TINY.heads * TINY.context ** 2 * d
    with pytest.raises(ValueError, match="only be the first"):
        fqtsim.cost.training_step(NPU, workloads.gpt(TINY)[::-1], 2)


def test_gpt2_small_has_its_published_size_and_a_training_step():
    layers = workloads.workload("gpt2")
    # GPT-2 small: 124,439,808 parameters, of which its 25 LayerNorms hold 38,400
    assert sum(layer.weights + layer.bias for layer in layers) == 124_439_808 - 25 * 2 * 768
    assert [l.name for l in layers[:8]] == ["embed", "h.0.qkv", "h.0.scores", "h.0.context",
                                            "h.0.proj", "h.0.mlp.fc1", "h.0.mlp.fc2", "h.1.qkv"]
    step = fqtsim.cost.training_step(NPU, "gpt2", 1)
    forward = step[(step.gemm == "output") & (step.event == "mac_8x8")]["count"].sum()
    weights = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 4 * 768) + 768 * 50257   # per token
    attention = 12 * 2 * 1024 * 768                                  # Q K^T and P V, per token
    assert forward == 1024 * (weights + attention)
    between = set(step.loc[step.gemm.isin(["between", "between_grad"]), "event"])
    assert {"softmax", "softmax_grad", "ln_norm", "ln_grad", "gelu", "residual_add"} <= between


def test_the_corpus_keeps_its_vocabulary_and_is_cached(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    (lib / "test").mkdir(parents=True)
    (lib / "pkg.py").write_text('"""Module text \u00e9\u2014 kept."""\n'
                                'def f():\n    """Function text."""\n')
    (lib / "test" / "t.py").write_text('"""Test text."""\n')
    assert corpus._docstrings(lib) == ["Module text  kept.", "Function text."]
    monkeypatch.setenv("FQTSIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "_docstrings", lambda root: [f"doc {i}" for i in range(20)])
    train_text, validation = corpus.stdlib_docs()
    assert validation == "doc 0\n\ndoc 10" and "doc 0" not in train_text.split("\n\n")
    monkeypatch.setattr(corpus, "_docstrings", None)   # the second build is the cache's
    assert corpus.stdlib_docs() == (train_text, validation)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [corpus.cache_path().name]
    ids = corpus.encode("ab\n~")
    assert corpus.decode(ids) == "ab\n~" and len(corpus.VOCAB) == 96
    x, y = corpus.windows(np.arange(100), 10, 4, seed=0)
    assert x.shape == y.shape == (4, 10) and (y == x + 1).all()


@pytest.mark.parametrize("change, expect", [
    ({"dataset": "digits"}, "--model gpt needs text"),
    ({"model": "mlp"}, "--model mlp needs images"),
    ({"range_policy": "predicted"}, "--range predicted: not for --model gpt")])
def test_bad_language_model_options(change, expect):
    with pytest.raises(ValueError, match=expect):
        RunConfig(**{"model": "gpt", "dataset": "stdlib-docs", **change})


def test_a_language_model_run_logs_validation_loss_per_epoch(tmp_path, monkeypatch):
    """A run of the default GPT on a few windows of stdlib-docs: validation loss in nats and
    bits per character each epoch and in the summary; its steps are the closed form's."""
    monkeypatch.setitem(data.TEXT, "train", 32)
    monkeypatch.setitem(data.TEXT, "test", 8)
    summary = train(RunConfig(hw=str(HW_DIR / "npu.yaml"), model="gpt", dataset="stdlib-docs",
                              epochs=2, batch_size=16, lr=0.5, out=str(tmp_path / "r")),
                    progress=False)
    metrics = pd.read_csv(tmp_path / "r" / "metrics.csv")
    epochs = metrics.dropna(subset=["val_loss"])
    assert list(epochs.step) == [1, 3] and (epochs.bits_per_char == epochs.val_loss / np.log(2)).all()
    assert summary["val_loss"] == summary["loss"] == epochs.val_loss.iloc[-1]
    assert summary["bits_per_char"] == pytest.approx(summary["val_loss"] / np.log(2))
    assert summary["val_loss"] < np.log(96) and not summary["warnings"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == summary
    ledger = pd.read_csv(tmp_path / "r" / "ledger.csv", dtype={"layer": str})
    got = ledger[(ledger.step == 2) & ~ledger.event.isin(["overflow", "clip"])]
    closed = fqtsim.cost.training_step(load_hw(HW_DIR / "npu.yaml"), workloads.gpt(), 16)
    assert list(got.set_index(KEY).sort_index().index) == list(closed.set_index(KEY).sort_index().index)
    np.testing.assert_allclose(got.set_index(KEY).sort_index().energy_pj,
                               closed.set_index(KEY).sort_index().energy_pj, rtol=1e-9)


def test_the_cost_command_prices_a_gpt2_step(capsys):
    from fqtsim.cli import main

    assert main(["cost", "--model", "gpt2", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "one training step of gpt2 at batch 1" in out and "bhq" in out
