"""The ops between the GEMMs: events per op checked by hand, chains, sharing with the quantizer,
the workloads' op lists against the torch models, a whole step."""
from collections import Counter

import pytest
from torch import nn

import fqtsim
from fqtsim.hardware.mapping import Producer, nbytes, wide_store_bits
from fqtsim.simulation import between as bt
from fqtsim.simulation import workloads
from fqtsim.simulation.ledger import PASS_MEMORY, PASS_OPS, GemmSpec, price
from fqtsim.simulation.schedule import QuantScheme, input_events
from fqtsim.simulation.workloads import Layer, Op
from fqtsim.training.models import MLP_DEPTHS, build, mlp_widths

HW = fqtsim.load_hw("npu")
WIDE = wide_store_bits(HW)   # 32: npu stores wide tensors as raw int32 sums
S = bt.Shape(2, 3, 4)        # 2 samples x 3 channels x 4 positions: 24 elements
TCM_ONLY = bt.placement(HW)


def rows(events):
    return {k: [v[0], v[1]] for k, v in events.items()}


def pj(hw, events):
    return sum(r[5] for r in price(hw, "between", GemmSpec(8, 8), events))


def minus(a, b):
    """Rows of a that b lacks or has less of: (count, bytes) differences."""
    out = {}
    for key in set(a) | set(b):
        x, y = a.get(key, [0, 0.0, 0.0]), b.get(key, [0, 0.0, 0.0])
        if (x[0], x[1]) != (y[0], y[1]):
            out[key] = [x[0] - y[0], x[1] - y[1]]
    return out


# --- one op ------------------------------------------------------------------------------------

def test_bn_forward_on_2x3x4_with_fused_statistics():
    events = bt.bn_forward(HW, S, WIDE, "ddr")
    assert rows(events) == {("norm_stats", "array"): [24, 0.0],   # beside the GEMM's write
                            ("bn_channel", "vector"): [3, 0.0],
                            ("bn_norm", "vector"): [24, 0.0],
                            ("bn_norm", "ddr"): [24, 96.0]}      # 24 x 4 B read once
    v, tcm, ddr = HW.vector, HW.tcm, HW.ddr
    expect = (24 * (2 * v.add.pj + v.mul.pj) + 3 * (18 * v.mul.pj + 11 * v.add.pj)
              + 24 * (v.mul.pj + v.add.pj)
              + 96 * (tcm.write_pj_per_byte + tcm.read_pj_per_byte + ddr.read_pj_per_byte))
    assert sum(r[5] for r in price(HW, "bn", GemmSpec(8, 8), events) if r[1] != "static") == \
        pytest.approx(expect)


def test_bn_forward_statistics_by_a_pass_read_the_tensor(make_hw):
    hw = make_hw("npu", **{"pipeline.range": "pass"})
    events = bt.bn_forward(hw, S, 8, "tcm")
    assert rows(events)[("norm_stats", "vector")] == [24, 0.0]
    assert rows(events)[("norm_stats", "tcm")] == [24, 24.0]   # 8-bit y: a byte each
    assert rows(events)[("bn_norm", "tcm")] == [24, 24.0]


def test_bn_backward_reads_dy_and_y_twice():
    events = bt.bn_backward(HW, S, WIDE, "tcm", saved_bits=8, saved_level="ddr")
    pass_rows = {"vector": [24, 0.0], "tcm": [24, 96.0], "ddr": [24, 24.0]}   # dy 4 B, y 1 B
    assert rows(events) == {**{("bn_grad_sums", lvl): r for lvl, r in pass_rows.items()},
                            **{("bn_grad", lvl): r for lvl, r in pass_rows.items()},
                            ("bn_grad_channel", "vector"): [3, 0.0]}


def test_relu_mask_is_a_bit_per_element_and_add_reads_one_operand():
    assert rows(bt.relu_forward(HW, S, "ddr")) == {("relu", "vector"): [24, 0.0],
                                                   ("relu_mask", "ddr"): [24, 3.0]}
    assert rows(bt.relu_backward(HW, S, "ddr")) == {("relu_grad", "array"): [24, 0.0],
                                                    ("relu_grad", "ddr"): [24, 3.0]}
    assert rows(bt.add_forward(HW, S, WIDE, "ddr", at="array")) == {
        ("residual_add", "array"): [24, 0.0], ("residual_add", "ddr"): [24, 96.0]}
    fork = bt.Shape(2, 1, 4)   # the block's input: 8 elements
    assert rows(bt.add_backward(HW, fork, WIDE, "ddr")) == {
        ("residual_grad", "array"): [8, 0.0], ("residual_grad", "ddr"): [8, 32.0]}


def test_pools():
    s = bt.Shape(1, 2, 16)   # 4x4 maps, 3x3 stride-2 windows: 2x2 outputs per channel
    assert rows(bt.maxpool_forward(HW, s, 4, 9, "ddr")) == {
        ("maxpool", "vector"): [8 * 8, 0.0],     # 8 outputs, 8 compares each
        ("pool_index", "ddr"): [8, 4.0]}         # 4-bit argmax of 9
    assert rows(bt.maxpool_backward(HW, s, 4, 9, WIDE, "tcm", "ddr")) == {
        ("maxpool_grad", "vector"): [8, 0.0], ("maxpool_grad", "tcm"): [8, 32.0],
        ("maxpool_grad", "ddr"): [8, 4.0]}
    assert rows(bt.avgpool_forward(HW, S)) == {("avgpool", "vector"): [24, 0.0]}
    assert rows(bt.avgpool_backward(HW, S, 1, WIDE, "tcm")) == {
        ("avgpool_grad", "vector"): [6, 0.0], ("avgpool_grad", "tcm"): [6, 24.0]}


def test_softmax_cross_entropy_on_2_samples_of_10_logits():
    logits = bt.Shape(2, 10, 1)
    assert rows(bt.softmax_ce_forward(HW, logits, WIDE, "tcm")) == {
        ("softmax_max", "array"): [20, 0.0], ("softmax", "vector"): [20, 0.0],
        ("softmax", "tcm"): [20, 80.0], ("softmax_row", "vector"): [2, 0.0],
        ("ce_row", "vector"): [2, 0.0]}
    chain = bt.backward(HW, ("softmax_ce",), logits, bits=WIDE, grad_bits=WIDE, where=TCM_ONLY)
    assert rows(chain.events) == {("softmax_out", "vector"): [20, 0.0],
                                  ("softmax_out", "tcm"): [20, 80.0],
                                  ("pass_write", "tcm"): [20, 80.0]}   # dlogits
    assert chain.out == (20, WIDE, "tcm") and chain.read is None


def test_every_event_is_priced():
    """Each op's events price from the vector table and memories (no KeyError, no zero rows)."""
    s = bt.Shape(2, 4, 16)
    events = {}
    for layer_ops in (("bn", "relu", Op("maxpool", 4, 9)), ("bn", "add", "relu", "avgpool"),
                      ("add", "layernorm"), ("softmax",), ("gelu",), ("softmax_ce",)):
        for chain in (bt.forward(HW, layer_ops, s, bits=WIDE, where=TCM_ONLY),
                      bt.backward(HW, layer_ops, s, bits=WIDE, grad_bits=WIDE, where=TCM_ONLY)):
            bt.merge(events, chain.events)
    assert all(e in PASS_OPS if lvl in ("vector", "array") else e in PASS_MEMORY
               for e, lvl in events)
    assert all(r[5] > 0 for r in price(HW, "between", GemmSpec(8, 8), events))


# --- chains ------------------------------------------------------------------------------------

def test_a_pool_riding_bn_writes_the_pooled_tensor():
    s = bt.Shape(1, 2, 16)
    fwd = bt.forward(HW, ("bn", "relu", Op("maxpool", 4, 9)), s, bits=WIDE, where=TCM_ONLY)
    assert fwd.out == (8, WIDE, "tcm")                 # 2 channels x 4 pooled positions
    assert rows(fwd.events)[("pass_write", "tcm")] == [8, 32.0]
    assert rows(fwd.events)[("relu", "vector")] == [32, 0.0]
    assert fwd.read == (32, WIDE, "ddr")               # y: kept for BN's backward
    bwd = bt.backward(HW, ("bn", "relu", Op("maxpool", 4, 9)), s, bits=WIDE, grad_bits=WIDE,
                      where=TCM_ONLY)
    # scatter pass (writes the 32-element unpooled gradient, masked on the way), then BN's
    assert rows(bwd.events)[("pass_write", "tcm")] == [32 + 32, 256.0]
    assert rows(bwd.events)[("relu_grad", "vector")] == [32, 0.0]
    assert bwd.read == (8, WIDE, "tcm")                # the pooled gradient the GEMM above wrote


def test_a_residual_block_keeps_the_fork_gradient():
    fwd = bt.forward(HW, ("bn", "add", Op("relu", kept=True)), S, bits=WIDE, where=TCM_ONLY)
    assert fwd.kept and fwd.out == (24, WIDE, "ddr") and not fwd.range_known
    bwd = bt.backward(HW, ("bn", Op("add", fork=(6, 4)), "relu"), S, bits=WIDE, grad_bits=WIDE,
                      where=TCM_ONLY)
    ev = rows(bwd.events)
    assert ev[("residual_grad", "ddr")] == [48, 192.0]   # the 2 x 6 x 4 block input's gradient
    assert ev[("relu_grad", "array")] == [24, 0.0]       # in the output pipeline of the GEMM above
    assert ev[("bn_grad_sums", "ddr")] == [48, 192.0]    # dy kept (both branches read it) and y
    assert bwd.out == (24, WIDE, "tcm") and not bwd.kept


def test_layernorm_after_an_add_writes_a_kept_gradient():
    s = bt.Shape(2, 8, 4)
    fwd = bt.forward(HW, ("add", "layernorm"), s, bits=WIDE, where=TCM_ONLY)
    assert rows(fwd.events)[("residual_add", "array")] == [64, 0.0]
    assert rows(fwd.events)[("ln_row", "vector")] == [8, 0.0]   # one per token
    bwd = bt.backward(HW, ("add", "layernorm"), s, bits=WIDE, grad_bits=WIDE, where=TCM_ONLY)
    assert bwd.kept and bwd.out[2] == "ddr"   # the residual's gradient too


def test_relu_and_gelu_alone_ride_the_gemm():
    fwd = bt.forward(HW, ("relu",), S, bits=WIDE, where=TCM_ONLY)
    assert fwd.out is None and rows(fwd.events)[("relu", "array")] == [24, 0.0]
    fwd = bt.forward(HW, ("gelu",), S, bits=WIDE, where=TCM_ONLY)
    assert rows(fwd.events) == {("gelu", "array"): [24, 0.0], ("pass_write", "ddr"): [24, 96.0]}
    bwd = bt.backward(HW, ("gelu",), S, bits=WIDE, grad_bits=WIDE, where=TCM_ONLY)
    assert bwd.out is None and rows(bwd.events)[("gelu_grad", "ddr")] == [24, 96.0]


# --- sharing -----------------------------------------------------------------------------------

def activation_quantizer(hw, n, policy="dynamic", free=None):
    free = hw.tcm.size_bytes if free is None else free
    scheme = QuantScheme("ptq", policy, producer=Producer(free, 1))
    return input_events(hw, None, scheme, n, 1, 8)


def gradient_quantizers(hw, shape, method="psq", policy="dynamic", free=None):
    m, k = shape.samples * shape.positions, shape.channels
    producer = Producer(hw.tcm.size_bytes if free is None else free, 1)
    q = input_events(hw, None, QuantScheme(method, policy, rows_per_sample=shape.positions,
                                           producer=producer), m, k, 8)
    level = next((lvl for e, lvl in q if e == "wide_write"), None)   # dW's codes share it
    by_columns = QuantScheme("psq", policy, shared_at=level, producer=Producer(producer.free, None))
    bt.merge(q, input_events(hw, None, by_columns, k, m, 8))
    return q


def test_unshared_writes_the_tensor_once():
    q = activation_quantizer(HW, 24)
    chain = bt.forward(HW, ("bn", "relu"), S, bits=WIDE, where=TCM_ONLY, out_level="tcm")
    unshared = bt.pair(HW, q, chain, shared=False)
    # the pass's write is the quantizer's wide tensor, charged as its wide_write: one tensor
    # written, then ranged and read
    assert ("pass_write", "tcm") not in unshared
    assert rows(unshared)[("wide_write", "tcm")] == [24, 96.0]
    assert rows(unshared)[("requant_pass", "tcm")] == [24, 96.0]
    assert rows(unshared)[("code_write", "ddr")] == [24, 24.0]


def test_exact_sharing_writes_codes_from_bns_pass():
    q = activation_quantizer(HW, 24)
    chain = bt.forward(HW, ("bn", "relu"), S, bits=WIDE, where=TCM_ONLY, out_level="tcm")
    unshared = bt.pair(HW, q, chain, shared=False)
    shared = bt.pair(HW, q, chain, shared=True)
    assert shared == bt.pair(HW, q, chain, shared=True, mode="exact")
    # no wide write and no requantization read; the range ops and the codes stay
    assert minus(unshared, shared) == {("wide_write", "tcm"): [24, 96.0],
                                       ("requant_pass", "tcm"): [24, 96.0]}
    assert rows(shared)[("range_pass", "array")] == [24, 0.0]
    assert rows(shared)[("code_write", "ddr")] == [24, 24.0]


def test_exact_sharing_keeps_the_wide_copy_a_residual_reads():
    q = activation_quantizer(HW, 8, free=0)
    chain = bt.forward(HW, ("bn", "relu", Op("maxpool", 4, 9, kept=True)), bt.Shape(1, 2, 16),
                       bits=WIDE, where=TCM_ONLY)
    diff = minus(bt.pair(HW, q, chain, shared=False), bt.pair(HW, q, chain, shared=True))
    assert diff == {("requant_pass", "ddr"): [8, 32.0]}


def test_store_sharing_removes_the_range_read(make_hw):
    hw = make_hw("npu", **{"pipeline.range": "pass"})
    q = gradient_quantizers(hw, S)
    chain = bt.backward(hw, ("bn", "relu"), S, bits=WIDE, grad_bits=WIDE, where=bt.placement(hw),
                        out_level="tcm")
    unshared = bt.pair(hw, q, chain, shared=False)
    shared = bt.pair(hw, q, chain, shared=True, mode="store")
    assert minus(unshared, shared) == {("range_pass", "tcm"): [24, 96.0]}
    # with the config's fused ranges there is no read to remove: store changes nothing
    fused = bt.backward(HW, ("bn", "relu"), S, bits=WIDE, grad_bits=WIDE, where=TCM_ONLY,
                        out_level="tcm")
    q = gradient_quantizers(HW, S)
    assert bt.pair(HW, q, fused, shared=True, mode="store") == bt.pair(HW, q, fused, shared=False)


def test_recompute_wins_backward_when_y_is_stored_narrow():
    def ddr(size, kept):
        return "ddr"
    q = gradient_quantizers(HW, S, free=0)
    chain = bt.backward(HW, ("bn", "relu"), S, bits=8, grad_bits=WIDE, where=ddr)
    unshared = bt.pair(HW, q, chain, shared=False)
    shared = bt.pair(HW, q, chain, shared=True)
    assert shared == bt.pair(HW, q, chain, shared=True, mode="recompute")
    # the wide dx is neither written nor reread; BN's last pass (dy 4 B + y 1 B) runs again
    assert minus(unshared, shared) == {("wide_write", "ddr"): [24, 96.0],
                                       ("requant_pass", "ddr"): [24, 96.0],
                                       ("bn_grad", "ddr"): [-48, -120.0],
                                       ("bn_grad", "vector"): [-24, 0.0]}
    assert pj(HW, shared) < pj(HW, unshared)
    # with dx in TCM its round trip is cheaper than rereading y from DDR: store
    q = gradient_quantizers(HW, S)
    near = bt.backward(HW, ("bn", "relu"), S, bits=8, grad_bits=WIDE, where=TCM_ONLY,
                       out_level="tcm")
    assert bt.pair(HW, q, near, shared=True) == bt.pair(HW, q, near, shared=True, mode="store")
    # with y wide in DDR the bytes tie and the rerun's ops lose: store
    wide = bt.backward(HW, ("bn", "relu"), S, bits=WIDE, grad_bits=WIDE, where=ddr)
    q = gradient_quantizers(HW, S, free=0)
    assert bt.pair(HW, q, wide, shared=True) == bt.pair(HW, q, wide, shared=True, mode="store")


def test_bhq_and_delayed_ranges():
    chain = bt.backward(HW, ("bn", "relu"), S, bits=8, grad_bits=WIDE, where=TCM_ONLY,
                        out_level="tcm")
    bhq = gradient_quantizers(HW, S, method="bhq")
    with pytest.raises(ValueError, match="does not apply"):
        bt.pair(HW, bhq, chain, shared=True, mode="recompute")   # its transform needs the wide rows
    store = bt.pair(HW, bhq, chain, shared=True, mode="store")
    assert bt.pair(HW, bhq, chain, shared=True) == store
    delayed = gradient_quantizers(HW, S, policy="delayed")
    shared = bt.pair(HW, delayed, chain, shared=True)
    assert shared == bt.pair(HW, delayed, chain, shared=False)   # codes straight from the pass
    assert not any(e == "pass_write" for e, _ in shared)
    with pytest.raises(ValueError, match="no GEMM operand"):
        bt.pair(HW, delayed, bt.forward(HW, ("relu",), S, bits=WIDE, where=TCM_ONLY), shared=True)


@pytest.mark.parametrize("method, policy, rng", [
    ("psq", "dynamic", "fused"), ("psq", "dynamic", "pass"), ("ptq", "delayed", "fused"),
    ("bhq", "dynamic", "pass")])
def test_sharing_never_costs_more(make_hw, method, policy, rng):
    hw = make_hw("npu", **{"pipeline.range": rng})
    models = [workloads.resnet(18, image=32, classes=10), workloads.cnn((1, 8, 8)),
              workloads.transformer_block(16, 32, 2), workloads.mlp()]
    for layers in models:
        for bits in (None, 8):
            kw = dict(quantizer=method, range_policy=policy, activation_policy=policy, bits=bits)
            unshared = bt.step(hw, layers, 4, shared=False, **kw)
            shared = bt.step(hw, layers, 4, shared=True, **kw)
            for name in unshared:
                assert pj(hw, shared[name]) <= pj(hw, unshared[name]) * (1 + 1e-12), name


# --- workloads ---------------------------------------------------------------------------------

def kinds(layers):
    return Counter(op.kind for layer in layers for op in layer.between)


def test_layers_default_to_no_ops_and_take_kinds_as_strings():
    assert Layer("x", 1, 2, 3).between == ()
    assert Layer("x", 1, 2, 3, between=("bn", "relu")).between == (Op("bn"), Op("relu"))
    with pytest.raises(ValueError, match="between op"):
        Op("dropout")


@pytest.mark.parametrize("model", ["cnn", "cnn8", "mlp", "mlp6"])
def test_workload_ops_match_the_torch_models(model):
    torch_model = build(model, (1, 8, 8), 10)
    layers = workloads.cnn((1, 8, 8)) if model == "cnn" else workloads.cnn8((1, 8, 8)) \
        if model == "cnn8" else workloads.mlp(64, 10, hidden=tuple(mlp_widths(MLP_DEPTHS[model])))
    mods = Counter(type(m).__name__ for m in torch_model.modules())
    assert [layer.name for layer in layers] == [name for name, m in torch_model.named_modules()
                                                if isinstance(m, (nn.Linear, nn.Conv2d))]
    ops = kinds(layers)
    assert ops["bn"] == mods["BatchNorm2d"] and ops["relu"] == mods["ReLU"]
    assert ops["softmax_ce"] == 1 and layers[-1].between == (Op("softmax_ce"),)   # the loss
    # each BN normalizes its conv's output channels; each ReLU follows a GEMM with BN or alone
    features = [m.num_features for m in torch_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert features == [layer.n for layer in layers if Op("bn") in layer.between]


def test_resnet50_ops():
    layers = workloads.resnet(50)
    assert kinds(layers) == {"bn": 53, "relu": 49, "add": 16, "maxpool": 1, "avgpool": 1,
                             "softmax_ce": 1}
    stem = layers[0].between
    assert stem[2] == Op("maxpool", 56 * 56, 9)         # 112x112 -> 56x56
    assert layers[-2].between[-1] == Op("avgpool", 1, 49)
    # the identity a block adds is kept wide: every block output but a stage's last
    kept = [layer.name for layer in layers if layer.between and layer.between[-1].kept]
    assert len(kept) == 12 + 4   # 12 block outputs; 4 BN outputs waiting for a downsample
    assert kinds(workloads.resnet(18))["bn"] == 20 and kinds(workloads.resnet(18))["add"] == 8
    assert workloads.resnet(18)[0].between[-1].kept   # layer1.0 adds the max pool's output


def test_transformer_ops():
    ops = {layer.name: tuple(op.kind for op in layer.between)
           for layer in workloads.transformer_block()}
    assert ops == {"qkv": (), "scores": ("softmax",), "context": (), "proj": ("add", "layernorm"),
                   "mlp.fc1": ("gelu",), "mlp.fc2": ("add", "layernorm")}


# --- a whole step ------------------------------------------------------------------------------

def test_resnet50_step():
    layers = workloads.resnet(50)
    ops_only = bt.total(bt.step(HW, layers, 64, quantizers=False))
    bn = [layer for layer in layers if any(op.kind == "bn" for op in layer.between)]
    assert ops_only[("norm_stats", "array")][0] == sum(64 * l.n * l.rows for l in bn)
    assert ops_only[("bn_channel", "vector")][0] == sum(l.n for l in bn)
    unshared = bt.total(bt.step(HW, layers, 64))
    shared = bt.total(bt.step(HW, layers, 64, shared=True))
    # sharing here is forward only: the (bn, relu[, maxpool]) outputs written as codes straight;
    # backward, with fused ranges and y wide, nothing is cheaper than storing dx
    exact = sum(bt.forward(HW, l.between, bt.Shape(64, l.n, l.rows), bits=WIDE,
                           where=TCM_ONLY).out[0]
                for l in layers if l.between[:2] == (Op("bn"), Op("relu")))
    assert minus(unshared, shared) == {("wide_write", "ddr"): [exact, 4.0 * exact],
                                       ("requant_pass", "ddr"): [exact, 4.0 * exact]}
    assert pj(HW, shared) < pj(HW, unshared)
    # the GEMMs write y and dy of each BN, wide; dy pooled where a pool's backward reads it
    writes = bt.gemm_writes(HW, layers, 64)
    assert writes[("writeback", "ddr")][0] == 2 * sum(64 * l.n * l.rows for l in bn) \
        - 64 * 64 * (112 * 112 - 56 * 56) - 64 * 2048 * (49 - 1)
    assert writes[("writeback", "tcm")] == [64 * 1000, 256000.0, 0.0]   # the logits fit


def test_the_writes_for_a_pass_take_time_and_are_scaled_like_any_wide_store(make_hw):
    hw = make_hw("npu", **{"pipeline.wide_format": "bf16"})
    layer = workloads.cnn((1, 8, 8))[0]
    ops = bt.around(hw, layer, 100, first=True, quantizer="psq", range_policy="dynamic",
                    grad_bits=8)
    y = 100 * 16 * 64
    write = ops.forward[("writeback", "ddr")]
    assert write[:2] == [y, y * 2.0] and write[2] == y * 2.0 / hw.ddr.bytes_per_cycle
    assert ops.forward[("wide_scale", "array")][0] == y
    # backward BN writes dY wide (dynamic, its range known once written): the device rounds it
    assert ops.dy_coded and ops.dy_wide and ops.x_coded and not ops.x_wide


def test_delayed_codes_from_a_pass_are_the_vector_units_work():
    q = activation_quantizer(HW, 24, policy="delayed")
    chain = bt.forward(HW, ("bn", "relu"), S, bits=WIDE, where=TCM_ONLY, out_level="tcm")
    events = bt.pair(HW, q, chain, shared=True)
    assert rows(events)[("requant_pass", "vector")] == [24, 0.0]
    assert ("requantize", "array") not in events and ("pass_write", "tcm") not in events
