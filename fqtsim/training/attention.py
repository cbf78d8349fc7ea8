"""FQT for a transformer: GEMMs of two activations on the simulated device, and embeddings.

Attention's products, Y = A B per sequence and head (scores: A = Q, B = K^T; context: A = P, the
softmax output, B = V), are G = batch x heads GEMMs of one shape, each run on the device as the
framework runs a layer's (`fqtsim.training.fqt`):

    output       Y  = A~ B~                  A~, B~: 8-bit codes, per tensor (each GEMM's own
                                             operand), round to nearest
    grad_input   dA = Q_ba(dY) B~^T          Q_ba: PTQ (per GEMM), PSQ (per token row) or BHQ
                                             (its rows' transform within the GEMM), grad_bits
    grad_weight  dB = (Q_bw(dY)^T A~)^T      Q_bw: 8-bit, per tensor with PTQ, per column of dY
                                             (a key or a head feature) with PSQ and BHQ

so both operands of the forward GEMM are activations quantized on the device from wide tensors:
A as any layer's input (handed off by the layer below, or coded by the softmax pass), B from the
wide output of the layer that produced it (`Layer.b_source`, qkv), its quantizer's passes
charged with the forward GEMM. dB is handed off at full width, as grad_input's dA is, to the
quantizers of qkv's gradient. Delayed ranges: one history per operand, one range for every GEMM
of the batch. The G GEMMs run as one batch (`Device.matmul_batch`), one ledger entry per event:
what `fqtsim.cost` charges, one GEMM's events times G. The clips of B (delayed ranges) are
counted with A's.

Embeddings: the lookup runs in float; the device records its events from the closed form
(`fqtsim.simulation.embedding`), as it does the ops between the GEMMs.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fqtsim.hardware.mapping import by_columns
from fqtsim.quantizers import Quantized, quantize_gradient
from fqtsim.quantizers.affine import quantize_affine
from fqtsim.simulation import embedding
from fqtsim.simulation.passes import input_passes
from fqtsim.simulation.schedule import (FORWARD_BITS, GRAD_WEIGHT_BITS, QuantScheme,
                                        activation_scheme, weight_gradient_method)
from fqtsim.training.fqt import Simulator


class FQTProduct(nn.Module):
    """a @ b, (B, H, T, K) @ (B, H, K, N) -> (B, H, T, N), one device GEMM per sequence and
    head, with the GEMMs of the run's mode (qat: the forward on the device, the backward float
    on the quantized operands)."""

    def __init__(self, sim: Simulator, name: str):
        super().__init__()
        _check_described(sim, name)
        self.sim, self.name = sim, name

    def forward(self, a, b):
        return _FQTProduct.apply(a, b, self)


class _FQTProduct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, b, layer):
        sim, name = layer.sim, layer.name
        spec = sim.layers[name]   # the workload layer: its B's source
        batch = a.shape[0]
        a64 = _groups(a)
        below = sim.around(sim.below(name), batch)
        if below.x_wide:   # the softmax pass stored P at full width before quantizing it
            a64 = sim.wide(a64)
        # the policies before the histories observe this step
        scheme = activation_scheme(sim.policy(f"{name}.input"), sim.device.last_handoff,
                                   below.x_coded)
        b_scheme = activation_scheme(sim.policy(f"{name}.operand"), sim.handoffs[spec.b_source])
        qa = _activations(sim, f"{name}.input", a64)
        qb = _activations(sim, f"{name}.operand", _groups(b))
        operand = input_passes(sim.device.hw, None, b_scheme, qb[0])
        operand.pop(("clip", "array"), None)   # counted with A's
        clips = sum(q.clipped for q in qb)
        qa[0] = replace(qa[0], clipped=qa[0].clipped + clips)
        ops = sim.around(name, batch)
        consumer = None if ops.y_read else sim.consumer(name, "forward")
        y = sim.device.matmul_batch(qa, qb, scheme=scheme, writeback="handoff", consumer=consumer,
                                    also=operand, name=f"{name}.output")
        sim.handoffs[name] = sim.device.last_handoff
        sim.device.record(ops.forward, f"{name}.between")
        ctx.qa, ctx.qb, ctx.layer, ctx.shapes = qa, qb, layer, (a.shape, b.shape)
        return torch.from_numpy(y.reshape(*a.shape[:-1], b.shape[-1])).to(a.dtype)

    @staticmethod
    def backward(ctx, dy):
        qa, qb, layer = ctx.qa, ctx.qb, ctx.layer
        sim, name, config = layer.sim, layer.name, layer.sim.config
        a_shape, b_shape = ctx.shapes
        if config.mode == "qat":   # straight-through: float backward on the quantized operands
            a_q, b_q = (torch.from_numpy(np.stack([q.dequantize() for q in qs])).to(dy.dtype)
                        for qs in (qa, qb))
            dy3 = dy.reshape(a_q.shape[0], a_q.shape[1], -1)
            return ((dy3 @ b_q.transpose(1, 2)).reshape(a_shape),
                    (a_q.transpose(1, 2) @ dy3).reshape(b_shape), None)
        batch = dy.shape[0]
        dy64 = _groups(dy)
        producer = sim.producer(name)
        ops = sim.around(name, batch)   # before the quantizers observe
        sim.device.record(ops.backward, f"{name}.between_grad")
        if ops.dy_wide:   # the softmax's backward pass stored dS at full width
            dy64 = sim.wide(dy64)
        key = f"{name}.grad_input"
        scheme = QuantScheme(config.quantizer, sim.policy(key), producer=producer,
                             coded=ops.dy_coded)
        qs = _gradients(sim, key, dy64, config.quantizer, config.grad_bits)
        below = sim.around(sim.below(name), batch)
        consumer = None if below.dz_read or below.dy_coded else sim.consumer(name, "backward")
        da = sim.device.matmul_batch(qs, [w.T for w in qb], scheme=scheme, writeback="handoff",
                                     consumer=consumer, name=f"{name}.grad_input")
        wide_at = sim.device.last_gradient_level if scheme.materializes else None
        handoff = sim.device.last_handoff   # the layer below's gradient: charged as dA's writer
        key = f"{name}.grad_weight"
        method = weight_gradient_method(config.quantizer)
        scheme = QuantScheme(method, sim.policy(key), shared_at=wide_at,
                             producer=by_columns(producer), coded=ops.dy_coded)
        qs = _gradients(sim, key, dy64.transpose(0, 2, 1), method, GRAD_WEIGHT_BITS)
        db = sim.device.matmul_batch(qs, qa, scheme=scheme, writeback="handoff",
                                     name=f"{name}.grad_weight").transpose(0, 2, 1)   # (N x K)^T
        sim.device.last_handoff = handoff
        return (torch.from_numpy(da.reshape(a_shape)).to(dy.dtype),
                torch.from_numpy(db.reshape(b_shape)).to(dy.dtype), None)


def _check_described(sim: Simulator, name: str):
    if name not in sim.layers:
        raise ValueError(f"{name}: the Simulator needs the model's workload layers (layers="
                         f"fqtsim.simulation.workloads.gpt(shape)): they say where its operands "
                         f"come from and what its lookup costs")


def _groups(x: torch.Tensor) -> np.ndarray:
    """(..., R, C) as G = prod(...) matrices of R x C in float64."""
    return x.detach().double().reshape(-1, *x.shape[-2:]).numpy()


def _activations(sim: Simulator, key: str, x: np.ndarray) -> list[Quantized]:
    """8-bit codes of each of the G matrices of `x`, per matrix, to nearest; delayed ranges: one
    from tensor `key`'s history for all of them (its clips counted on the first)."""
    g, r, c = x.shape
    bounds = sim.delayed_bounds(key)
    sim.observe(key, float(x.min()), float(x.max()))
    q = quantize_affine(x.reshape(g, r * c), FORWARD_BITS, "rows", stochastic=False, **bounds)
    return [Quantized(q.codes[i].reshape(r, c), q.scale[i:i + 1], q.offset[i:i + 1],
                      q.bits, "tensor", clipped=q.clipped if i == 0 else 0) for i in range(g)]


def _gradients(sim: Simulator, key: str, x: np.ndarray, method: str, bits: int) -> list[Quantized]:
    """Stochastic codes of each of the G matrices of gradient `x` by `method`: PTQ per matrix,
    PSQ per row (a token), BHQ per row of its transform over the matrix's rows; delayed ranges
    from tensor `key`'s history, one for all (clips counted on the first)."""
    g, r, c = x.shape
    if method == "mxint":   # blocks along each row; no ranges
        q = quantize_gradient(x.reshape(g * r, c), "mxint", bits, sim.rng,
                              block=sim.device.hw.pipeline.block)
        return [replace(q, codes=q.codes[i * r:(i + 1) * r], scale=q.scale[i * r:(i + 1) * r],
                        clipped=q.clipped if i == 0 else 0) for i in range(g)]
    bounds = sim.delayed_bounds(key)
    if method == "bhq":
        qs = [quantize_gradient(m, "bhq", bits, sim.rng, **bounds) for m in x]
        observed = (min(q.observed[0] for q in qs), max(q.observed[1] for q in qs))
        qs = [replace(q, clipped=sum(q.clipped for q in qs) if i == 0 else 0)
              for i, q in enumerate(qs)]
    else:
        rows = (g, r * c) if method == "ptq" else (g * r, c)   # a range per matrix, or per row
        q = quantize_gradient(x.reshape(rows), "psq", bits, sim.rng, **bounds)
        observed, per = q.observed, 1 if method == "ptq" else r
        qs = [Quantized(q.codes[i * per:(i + 1) * per].reshape(r, c),
                        q.scale[i * per:(i + 1) * per], q.offset[i * per:(i + 1) * per], q.bits,
                        "tensor" if method == "ptq" else "rows",
                        clipped=q.clipped if i == 0 else 0) for i in range(g)]
    sim.observe(key, *observed)
    return qs


class FQTEmbedding(nn.Module):
    """The token and position lookup in float (sharing the original tables), its events
    charged on the device: the lookup and the chain after it forward, the chain's backward,
    the scatter of the gradient and the tables' update backward."""

    def __init__(self, embed: nn.Module, sim: Simulator, name: str):
        super().__init__()
        _check_described(sim, name)
        self.tokens, self.positions = embed.tokens, embed.positions
        self.sim, self.name = sim, name

    def forward(self, idx):
        sim, name = self.sim, self.name
        batch = idx.shape[0]
        spec, hw = sim.layers[name], sim.device.hw
        sim.device.record(embedding.gather(hw, spec, batch, sim.state_at, sim.formats),
                          f"{name}.output")
        sim.device.record(sim.around(name, batch).forward, f"{name}.between")
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        return _Charged.apply(x, self)


class _Charged(torch.autograd.Function):
    """The identity, charging an FQT embedding's backward events as its gradient passes."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x

    @staticmethod
    def backward(ctx, dx):
        layer = ctx.layer
        sim, name = layer.sim, layer.name
        if sim.config.mode == "fqt":
            spec, hw, batch = sim.layers[name], sim.device.hw, dx.shape[0]
            ops = sim.around(name, batch)
            sim.device.record(ops.backward, f"{name}.between_grad")
            sim.device.record(embedding.scatter(hw, spec, batch, ops.dx_level),
                              f"{name}.grad_weight")
            sim.device.record(embedding.update(hw, spec, sim.state_at, sim.formats),
                              f"{name}.update")
        return dx, None
