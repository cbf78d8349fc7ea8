"""FQT layers: Linear and Conv2d whose GEMMs run as integer GEMMs on the simulated device.

For a layer y = x W^T (a conv layer is the same on its im2col matrix, one row per sample and
output position), with x~, W~ the 8-bit forward-quantized input and weight:

    output       y  = x~ W~^T                 8-bit activations (per tensor, round to nearest)
                                              x 8-bit symmetric weights (per tensor)
    grad_input   dx = Q_ba(dy) W~             Q_ba: PTQ, PSQ or BHQ at grad_bits, stochastic
    grad_weight  dW = Q_bw(dy)^T x~           Q_bw: 8-bit, per tensor with PTQ, per output
                                              feature (column of dy) with PSQ and BHQ

Modes: `fp32` leaves the model alone; `qat` runs the forward GEMM on the device and the backward
in float (straight-through); `fqt` runs all three on the device. Weights stay FP32 masters that
the optimizer updates; BatchNorm, ReLU and pooling stay float.

A conv layer's im2col matrix is charged as the device builds it, from the feature map in DDR
(`fqtsim.hardware.conv`), and grad_input's im2col-shaped output as folded back onto the input (col2im).

Cost accounting: dy arrives at accumulator width from the layer above, so `grad_input` charges
its quantizer's passes (wide write, ranges, ...) and `grad_weight` shares that wide tensor; the
grad_input output is handed off at accumulator width to the next quantizer down; the weight
update of FP32 masters (the optimizer itself runs in torch) is charged as `update`. The forward
activation ranges are computed from the data but charged as calibrated (fused write-back): the
catch-22 the paper's reviewers raise concerns the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fqtsim.hardware.conv import Im2col
from fqtsim.simulation.device import Device
from fqtsim.hardware.mapping import Producer, by_columns, loss_producer
from fqtsim.quantizers import (DelayedRange, check_bits, quantize_activation, quantize_gradient,
                               quantize_weight)
from fqtsim.simulation.schedule import (FORWARD_BITS, GRAD_WEIGHT_BITS, QuantScheme,
                                        weight_gradient_method)

MODES = ("fp32", "qat", "fqt")


@dataclass(frozen=True)
class FQTConfig:
    """How a converted model quantizes: mode, the activation-gradient quantizer and its bits."""
    mode: str = "fqt"
    quantizer: str = "psq"
    grad_bits: int = 8
    range_policy: str = "dynamic"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: got {self.mode!r}; expected one of {', '.join(MODES)}")
        QuantScheme(self.quantizer, self.range_policy)   # validates both
        check_bits(self.grad_bits)


class Simulator:
    """What the converted layers of one model share: the device, the config, the random
    stream for stochastic rounding and the delayed-range histories."""

    def __init__(self, device: Device, config: FQTConfig, seed: int = 0):
        self.device = device
        self.config = config
        self.rng = np.random.default_rng(seed)
        self._histories: dict[str, DelayedRange] = {}
        self.probe: dict | None = None   # set to a dict to keep each layer's backward operands
        self.top: str | None = None      # the last converted layer, whose gradient the loss writes

    def state(self) -> dict:
        """What a checkpoint needs to continue the run exactly: the random stream, the range
        histories and where the device left its last outputs."""
        return {"rng": self.rng.bit_generator.state,
                "histories": {k: h.state() for k, h in self._histories.items()},
                "device": self.device.state()}

    def restore(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self._histories = {k: DelayedRange.from_state(h) for k, h in state["histories"].items()}
        self.device.restore(state["device"])

    def producer(self, layer: str) -> Producer:
        """What wrote `layer`'s output gradient wide: the loss for the top layer, else the
        grad_input GEMM of the layer above, which the device ran last with a hand-off."""
        if layer == self.top or self.device.last_handoff is None:
            return loss_producer(self.device.hw)
        return self.device.last_handoff

    def quantize(self, key: str, x: np.ndarray, method: str, bits: int, rows_per_sample: int = 1,
                 shared_at: str | None = None, producer: Producer | None = None):
        """Quantize gradient `x` under the run's range policy; returns (codes, scheme used).

        Delayed ranges come from this tensor's history; before it has any, the step is dynamic.
        """
        bounds, policy = {}, "dynamic"
        history = None
        if self.config.range_policy == "delayed":
            history = self._histories.setdefault(key, DelayedRange())
            if history.bounds() is not None:
                lo, hi = history.bounds()
                bounds, policy = {"lo": lo, "hi": hi}, "delayed"
        q = quantize_gradient(x, method, bits, self.rng, rows_per_sample=rows_per_sample, **bounds)
        if history is not None:
            history.observe(*q.observed)
        return q, QuantScheme(method, policy, shared_at=shared_at, rows_per_sample=rows_per_sample,
                              producer=producer)


class _FQTMatmul(torch.autograd.Function):
    """y = x @ w^T for x (M x K), w (N x K), with the GEMMs of the layer's mode on the device."""

    @staticmethod
    def forward(ctx, x, w, layer):
        sim = layer.sim
        qx = quantize_activation(x.detach().double().numpy(), FORWARD_BITS)
        qw = quantize_weight(w.detach().double().numpy(), FORWARD_BITS)
        y = sim.device.matmul(qx, qw.T, a_im2col=layer.im2col, name=f"{layer.name}.output")
        ctx.qx, ctx.qw, ctx.layer, ctx.im2col = qx, qw, layer, layer.im2col
        return torch.from_numpy(y).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        qx, qw, layer = ctx.qx, ctx.qw, ctx.layer
        sim, config = layer.sim, layer.sim.config
        need_dx = ctx.needs_input_grad[0]
        if config.mode == "qat":  # straight-through: float backward with the quantized operands
            x_q, w_q = (torch.from_numpy(q.dequantize()).to(dy.dtype) for q in (qx, qw))
            return (dy @ w_q if need_dx else None), dy.t() @ x_q, None
        dy64 = dy.detach().double().numpy()
        if sim.probe is not None:   # for variance analysis: what this layer's backward saw
            sim.probe[layer.name] = {"dy": dy64, "x": qx.dequantize(), "w": qw.dequantize(),
                                     "rows_per_sample": layer.rows_per_sample}
        dx, wide_at = None, None
        producer = sim.producer(layer.name)
        if need_dx:
            q, scheme = sim.quantize(f"{layer.name}.grad_input", dy64, config.quantizer,
                                     config.grad_bits, layer.rows_per_sample, producer=producer)
            out = sim.device.matmul(q, qw, scheme=scheme, writeback="handoff",
                                    col2im=ctx.im2col, name=f"{layer.name}.grad_input",
                                    consumer=(config.quantizer, config.range_policy, config.grad_bits))
            dx = torch.from_numpy(out).to(dy.dtype)
            wide_at = sim.device.last_gradient_level if scheme.materializes else None
        q, scheme = sim.quantize(f"{layer.name}.grad_weight", dy64.T,
                                 weight_gradient_method(config.quantizer), GRAD_WEIGHT_BITS,
                                 shared_at=wide_at, producer=by_columns(producer))
        dw = sim.device.matmul(q, qx, scheme=scheme, writeback="materialized",
                               b_im2col=ctx.im2col, name=f"{layer.name}.grad_weight")
        sim.device.update(qw.codes.size, name=f"{layer.name}.update")
        return dx, torch.from_numpy(dw).to(dy.dtype), None


class FQTLinear(nn.Module):
    """nn.Linear with its GEMMs on the simulated device; shares the original parameters."""
    rows_per_sample = 1
    im2col = None

    def __init__(self, linear: nn.Linear, sim: Simulator, name: str):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.sim, self.name = sim, name

    def forward(self, x):
        y = _FQTMatmul.apply(x, self.weight, self)
        return y if self.bias is None else y + self.bias


class FQTConv2d(nn.Module):
    """nn.Conv2d as im2col + an FQT GEMM; shares the original parameters. The numerics unfold
    the input in torch; the device charges the im2col matrix as built on chip from the feature
    map (`im2col`, the last batch's geometry) and grad_input's fold back onto it (col2im)."""

    def __init__(self, conv: nn.Conv2d, sim: Simulator, name: str):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
                or conv.dilation != (1, 1):
            raise ValueError(f"{name}: only ungrouped, undilated convolutions with numeric zero "
                             f"padding are supported")
        self.weight, self.bias = conv.weight, conv.bias
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding = conv.padding
        self.sim, self.name = sim, name
        self.rows_per_sample = 1
        self.im2col: Im2col | None = None

    def forward(self, x):
        n, c, h, w = x.shape
        self.im2col = Im2col(n, c, h, w, self.kernel_size, self.stride, self.padding)
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (N, CKK, L)
        oh, ow = self.im2col.out_h, self.im2col.out_w
        self.rows_per_sample = oh * ow
        rows = cols.transpose(1, 2).reshape(n * oh * ow, -1)            # (N*L, CKK)
        y = _FQTMatmul.apply(rows, self.weight.reshape(self.weight.shape[0], -1), self)
        y = y.reshape(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow)
        return y if self.bias is None else y + self.bias[None, :, None, None]


def convert(model: nn.Module, sim: Simulator) -> nn.Module:
    """Swap every nn.Linear and nn.Conv2d of `model`, in place, for its FQT twin (a no-op in
    fp32 mode); other modules stay float. Returns the model."""
    if sim.config.mode == "fp32":
        return model
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, FQTLinear(child, sim, name))
            elif isinstance(child, nn.Conv2d):
                setattr(parent, child_name, FQTConv2d(child, sim, name))
            else:
                continue
            sim.top = name   # modules in forward order (nn.Sequential): the last one is the top
    return model
