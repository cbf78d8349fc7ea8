"""FQT layers: Linear and Conv2d whose GEMMs run as integer GEMMs on the simulated device.

For a layer y = x W^T (a conv layer is the same on its im2col matrix, one row per sample and
output position), with x~, W~ the 8-bit forward-quantized input and weight:

    output       y  = x~ W~^T                 8-bit activations (per tensor, round to nearest)
                                              x 8-bit symmetric weights (per tensor; int8
                                              stored weights: their codes, per channel)
    grad_input   dx = Q_ba(dy) W~             Q_ba: PTQ, PSQ, BHQ or mxint at grad_bits,
                                              stochastic; hadamard: Q_psq(dy R) (R^T W)~
    grad_weight  dW = Q_bw(dy)^T x~           Q_bw: 8-bit, per tensor with PTQ, per output
                                              feature (column of dy) with PSQ, BHQ and
                                              hadamard; mxint: blocks along the samples

Modes: `fp32` leaves the model alone; `qat` runs the forward GEMM on the device and the backward
in float (straight-through); `fqt` runs all three on the device. The weights are what the
optimizer stores (`fqtsim.training.optim`: FP32 masters, bf16, int16 or int8); where it stores
int8 codes per output channel the forward GEMM reads those codes as they are (`stored_codes`),
and grad_input, whose reduction runs along the channels, per-tensor codes of them. BatchNorm,
ReLU and pooling stay float.

A conv layer's im2col matrix is charged as the device builds it, from the feature map in DDR
(`fqtsim.hardware.conv`), and grad_input's im2col-shaped output as folded back onto the input (col2im).

Cost accounting: dy arrives at full width from the layer above, so `grad_input` charges its
quantizer's passes (wide write, ranges, ...) and `grad_weight` shares that wide tensor; the
grad_input output is handed off at full width to the next quantizer down. Where ops run between
the GEMMs (BatchNorm, ReLU, the loss's softmax: the layers' `between` lists, which the run's
workload layers give the Simulator), the device charges them as `fqtsim.simulation.between`
does (`between`, `between_grad` rows): the GEMMs hand their outputs to the ops' passes, and where
a pass writes a GEMM's operand its quantizer rides it and the GEMM charges none. The weight
update (computed by the optimizer) is charged as `update`, from the state's formats, with the
state where `fqtsim.cost.state_home` puts it. Forward activations follow the run's range policy
in numerics and in cost alike: each layer's output GEMM hands its output off at full width to the
next layer's input quantizer (dynamic: written wide, ranged, requantized; delayed: requantized in
the GEMM's pipeline with a range from the input's history, clips counted); the first layer's
input is data, coded once as it is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fqtsim.hardware.conv import Im2col
from kernels.conv import fold_rows, unfold_codes
from fqtsim.simulation.between import NONE, around
from fqtsim.simulation.device import Device, round_wide
from fqtsim.hardware.mapping import Producer, by_columns, loss_producer
from fqtsim.quantizers import (DelayedRange, Quantized, check_bits, quantize_activation,
                               quantize_gradient, quantize_weight, rotate_weight)
from fqtsim.quantizers.affine import group_range
from fqtsim.quantizers.bhq import block_householder
from fqtsim.quantizers.ranges import PredictedRange
from fqtsim.quantizers.storage import FP32_STATE, StateFormats
from fqtsim.simulation.schedule import (FORWARD_BITS, GRAD_WEIGHT_BITS, QuantScheme,
                                        activation_consumer, activation_scheme, bias_events,
                                        unpredicted, weight_gradient_method)

MODES = ("fp32", "qat", "fqt")
PTQ_RANGES = ("affine", "paper")   # FQTConfig.ptq_range


@dataclass(frozen=True)
class FQTConfig:
    """How a converted model quantizes: mode, the activation-gradient quantizer and its bits."""
    mode: str = "fqt"
    quantizer: str = "psq"
    grad_bits: int = 8
    range_policy: str = "dynamic"
    # PTQ's gradient ranges: "affine", the data's; "paper", stretched so that 0.0 is a code
    # (`quantize_affine(zero_exact=True)`), the same codes and passes, so the same costs
    ptq_range: str = "affine"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: got {self.mode!r}; expected one of {', '.join(MODES)}")
        QuantScheme(self.quantizer, self.range_policy)   # validates both
        check_bits(self.grad_bits)
        if self.ptq_range not in PTQ_RANGES:
            raise ValueError(f"ptq_range: got {self.ptq_range!r}; expected one of "
                             f"{', '.join(PTQ_RANGES)}")


class Simulator:
    """What the converted layers of one model share: the device, the config, the random
    stream for stochastic rounding and the delayed-range histories."""

    def __init__(self, device: Device, config: FQTConfig, seed: int = 0, state_at: str = "ddr",
                 layers=(), formats: StateFormats = FP32_STATE, stored_codes=None):
        self.device = device
        # the model's layers as fqtsim.simulation.workloads describes them: the ops between
        # the GEMMs, charged as the cost model charges them (none: the GEMMs alone)
        self.layers = {layer.name: layer for layer in layers}
        self.order: list[str] = []       # converted layers, bottom up
        self._arounds: dict = {}
        self.state_at = state_at   # where the optimizer state lives (fqtsim.cost.state_home)
        self.formats = formats     # how it is stored (fqtsim.quantizers.storage)
        # a weight parameter -> its stored codes, which the forward GEMM reads as they are
        # (the optimizer's `codes`: int8 weights), or None: the GEMM takes codes of its values
        self.stored_codes = stored_codes or (lambda param: None)
        self.config = config
        self.rng = np.random.default_rng(seed)
        self._histories: dict[str, DelayedRange] = {}
        self._predictors: dict[str, PredictedRange] = {}
        self.loss_norms: np.ndarray | None = None   # this step's ||p_i - y_i||, from the loss
        # set to a dict to keep each layer's backward operands and its gradient quantizers'
        # (input, output) pairs, under "grad_input" and "grad_weight"
        self.probe: dict | None = None
        self.top: str | None = None      # the last converted layer, whose gradient the loss writes
        self.bottom: str | None = None   # the first, whose input codes come from the data
        # layer -> what its forward GEMM handed its output on as (the producer of a later
        # layer's B operand: fqtsim.training.attention)
        self.handoffs: dict[str, Producer] = {}

    def state(self) -> dict:
        """What a checkpoint needs to continue the run exactly: the random stream, the range
        histories and where the device left its last outputs."""
        return {"rng": self.rng.bit_generator.state,
                "histories": {k: h.state() for k, h in self._histories.items()},
                "predictors": {k: p.state() for k, p in self._predictors.items()},
                "device": self.device.state()}

    def restore(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self._histories = {k: DelayedRange.from_state(h) for k, h in state["histories"].items()}
        self._predictors = {k: PredictedRange.from_state(p)
                            for k, p in state.get("predictors", {}).items()}
        self.device.restore(state["device"])

    def _policy(self, key: str) -> str:
        """The range policy the quantizer of tensor `key` runs with this step: predicted ranges
        for the per-sample quantizers of grad_input once their predictor has been fitted (and
        the loss has given this step's norms), ranges from history for the others, else
        dynamic. mxint's gradients take no ranges: their schemes carry the run's policy, which
        rules the activations."""
        if self.config.quantizer == "mxint" and key.endswith((".grad_input", ".grad_weight")):
            return unpredicted(self.config.range_policy)
        if self.config.range_policy == "predicted" and _by_sample(key):
            predictor = self._predictors.get(key)
            ready = predictor is not None and predictor.ready and self.loss_norms is not None
            return "predicted" if ready else "dynamic"
        history = self._histories.get(key)
        delayed = unpredicted(self.config.range_policy) == "delayed" and history is not None \
            and history.bounds() is not None
        return "delayed" if delayed else "dynamic"

    def policy(self, key: str) -> str:
        """The range policy the quantizer of tensor `key` runs with this step (before its
        history observes this step's range)."""
        return self._policy(key)

    def delayed_bounds(self, key: str) -> dict:
        """{'lo', 'hi'} of tensor `key`'s range this step from its history where the run's ranges
        are delayed and it has one; else {} (the data's own ranges)."""
        if unpredicted(self.config.range_policy) != "delayed":
            return {}
        bounds = self._histories.setdefault(key, DelayedRange()).bounds()
        return {} if bounds is None else dict(zip(("lo", "hi"), bounds))

    def observe(self, key: str, lo: float, hi: float):
        """Tensor `key`'s range this step, for its delayed history (nothing under other policies)."""
        if unpredicted(self.config.range_policy) == "delayed":
            self._histories.setdefault(key, DelayedRange()).observe(lo, hi)

    def prediction_report(self) -> dict:
        """Per predicted quantizer, how well its ranges were predicted (`PredictedRange.report`)."""
        return {key: p.report() for key, p in self._predictors.items()}

    def around(self, layer: str, batch: int):
        """`layer`'s ops between the GEMMs at `batch` samples (`between.Around`), with the
        policies its quantizers run with now: the forward chain's, the next layer's input
        quantizer's; the backward chain's, this layer's gradient quantizers'."""
        if layer not in self.layers:
            return NONE
        i = self.order.index(layer)
        above = self.order[i + 1] if i + 1 < len(self.order) else None
        grads = self._policy(f"{layer}.grad_input" if i else f"{layer}.grad_weight")
        inputs = self._policy(f"{above}.input") if above else "dynamic"
        key = (layer, batch, grads, inputs)   # shapes and policies only: the same every step
        if key not in self._arounds:
            self._arounds[key] = around(self.device.hw, self.layers[layer], batch, first=i == 0,
                                        quantizer=self.config.quantizer, range_policy=grads,
                                        grad_bits=self.config.grad_bits,
                                        activation_policy=inputs)
        return self._arounds[key]

    def consumer(self, layer: str, direction: str) -> tuple:
        """(method, policy, bits) of the quantizer that reads what `layer`'s GEMM hands off wide
        this step: forward, the next layer's input quantizer; backward, the gradient quantizer
        of the layer below (its grad_weight's, for the first layer)."""
        i = self.order.index(layer) if layer in self.order else None
        if direction == "forward":
            above = self.order[i + 1] if i is not None and i + 1 < len(self.order) else None
            return activation_consumer(self._policy(f"{above}.input"))
        below = self.below(layer)
        key = f"{below}.grad_weight" if below == self.bottom else f"{below}.grad_input"
        return self.config.quantizer, self._policy(key), self.config.grad_bits

    def wide(self, x: np.ndarray) -> np.ndarray:
        """`x` as the device stores a tensor at full width (`pipeline.wide_format`)."""
        return round_wide(self.device.hw.pipeline.wide_format, x)

    def below(self, layer: str) -> str | None:
        """The converted layer under `layer` (None for the first, or one not converted)."""
        i = self.order.index(layer) if layer in self.order else 0
        return self.order[i - 1] if i else None

    def producer(self, layer: str) -> Producer:
        """What wrote `layer`'s output gradient wide: the loss for the top layer, else the
        grad_input GEMM of the layer above, which the device ran last with a hand-off."""
        if layer == self.top or self.device.last_handoff is None:
            return loss_producer(self.device.hw)
        return self.device.last_handoff

    def quantize_input(self, layer: str, x: np.ndarray, coded: bool = False,
                       zero: bool = False):
        """A layer's forward input `x` as 8-bit codes, per tensor and to nearest, under the
        run's range policy (delayed: the range of this input's history, values beyond it
        clipped); returns (codes, scheme, the code of 0.0). The first layer's input is data,
        coded once as it is loaded (its own range; scheme None: no device work); every other one
        is the layer below's output, handed off at full width by its GEMM (the device's last
        hand-off), or coded by the pass of an op between them (`coded`). `zero`: the range takes
        in 0.0, which a conv's padding must code exactly (its map is quantized, then unfolded)."""
        def quantize(bounds):
            if zero and not bounds:
                bounds = {"lo": min(float(x.min()), 0.0), "hi": max(float(x.max()), 0.0)}
            q = quantize_activation(x, FORWARD_BITS, **bounds)
            naught = quantize_activation(np.zeros((1, 1)), FORWARD_BITS, **bounds).codes[0, 0] \
                if bounds else None
            return q, naught

        if layer == self.bottom:
            q, naught = quantize({})
            return q, None, naught
        bounds, policy = {}, "dynamic"
        if unpredicted(self.config.range_policy) == "delayed":
            history = self._histories.setdefault(f"{layer}.input", DelayedRange())
            if history.bounds() is not None:
                bounds, policy = dict(zip(("lo", "hi"), history.bounds())), "delayed"
            lo, hi = float(x.min()), float(x.max())
            history.observe(min(lo, 0.0) if zero else lo, max(hi, 0.0) if zero else hi)
        q, naught = quantize(bounds)
        return q, activation_scheme(policy, self.device.last_handoff, coded), naught

    def quantize(self, key: str, x: np.ndarray, method: str, bits: int, rows_per_sample: int = 1,
                 shared_at: str | None = None, producer: Producer | None = None,
                 coded: bool = False):
        """Quantize gradient `x` under the run's range policy; returns (codes, scheme used).

        Delayed ranges come from this tensor's history; predicted ones (grad_input's) from this
        step's loss norms; before either has anything to go on, the step is dynamic.
        """
        bounds, policy = {}, self._policy(key)
        history = predictor = predicted = None
        if method == "mxint":   # each block's scale is its own: no range to keep
            pass
        elif self.config.range_policy == "predicted" and _by_sample(key):
            predictor = self._predictors.setdefault(key, PredictedRange())
            if policy == "predicted":
                predicted = predictor.bounds(self.loss_norms)
                bounds = _group_bounds(predicted, x, method, rows_per_sample)
        elif unpredicted(self.config.range_policy) == "delayed":
            history = self._histories.setdefault(key, DelayedRange())
            if policy == "delayed":
                lo, hi = history.bounds()
                bounds = {"lo": lo, "hi": hi}
        zero_exact = method == "ptq" and self.config.ptq_range == "paper"
        q = quantize_gradient(x, method, bits, self.rng, rows_per_sample=rows_per_sample,
                              zero_exact=zero_exact, block=self.device.hw.pipeline.block,
                              **bounds)
        if predictor is not None and self.loss_norms is not None:   # the pipeline's row bounds
            lo, hi = group_range(x.reshape(len(self.loss_norms), -1), "rows")
            predictor.observe(self.loss_norms, lo, hi, predicted, q.clipped, x.size)
        if self.probe is not None:   # for variance analysis: what each quantizer saw and made
            layer, _, gemm = key.rpartition(".")
            self.probe.setdefault(layer, {})[gemm] = (x, q)
        if history is not None:
            history.observe(*q.observed)
        return q, QuantScheme(method, policy, shared_at=shared_at, rows_per_sample=rows_per_sample,
                              producer=producer, coded=coded)


def _by_sample(key: str) -> bool:
    """Whether quantizer `key` groups by sample (grad_input's, of dY's rows): the ones a
    predicted range policy predicts."""
    return key.endswith(".grad_input")


def _group_bounds(sample: tuple, x: np.ndarray, method: str, rows_per_sample: int) -> dict:
    """A quantizer's lo/hi from predicted per-sample bounds (N x 1 each): per sample for PSQ,
    their extremes for PTQ; for BHQ, the bounds its transform T (built, as the quantizer builds
    it, from x's rows) carries them to: row l of T x lies in sum_i T_li [lo_i, hi_i]."""
    lo, hi = sample
    if method == "psq":
        return {"lo": lo, "hi": hi}
    if method == "ptq":
        return {"lo": float(lo.min()), "hi": float(hi.max())}
    rows = x.reshape(len(lo), -1)
    row_lo, row_hi = group_range(rows, "rows")
    t = block_householder((row_hi - row_lo).ravel()).apply(np.eye(len(lo)))
    ends = np.stack([t * lo.T, t * hi.T])   # T_li lo_i and T_li hi_i
    return {"lo": ends.min(axis=0).sum(axis=1, keepdims=True),
            "hi": ends.max(axis=0).sum(axis=1, keepdims=True)}


class _FQTMatmul(torch.autograd.Function):
    """y = x @ w^T for x (M x K), w (N x K), with the GEMMs of the layer's mode on the device; for
    a conv, x is its input map and the GEMMs run on its im2col rows (y: one row per position)."""

    @staticmethod
    def forward(ctx, x, w, layer):
        sim = layer.sim
        batch = x.shape[0] if layer.im2col is not None else x.shape[0] // layer.rows_per_sample
        below = sim.around(sim.below(layer.name), batch)
        if layer.im2col is None:
            x64 = x.detach().double().numpy()
            if below.x_wide:   # the pass between stored it at full width before quantizing
                x64 = sim.wide(x64)
            qx, scheme, _ = sim.quantize_input(layer.name, x64, below.x_coded)
        else:   # a conv: the hardware quantizes the input map once, then builds im2col rows
            fmap = x.detach().double().numpy()
            if below.x_wide:
                fmap = sim.wide(fmap)
            qmap, scheme, naught = sim.quantize_input(layer.name, fmap.reshape(-1, fmap.shape[-1]),
                                                      below.x_coded, zero=layer.padded)
            qx = layer.unfold_codes(qmap, naught)
        w64 = w.detach().double().numpy()
        qw = quantize_weight(w64, FORWARD_BITS)   # grad_input's
        stored = sim.stored_codes(layer.weight)
        ops = sim.around(layer.name, batch)
        top = layer.name == sim.top   # its codes go to the loss; the others' to a quantizer
        to_quantizer = not top and not ops.y_read   # else a pass between the GEMMs reads it
        bias = None if layer.bias is None else bias_events(qx.codes.shape[0], w.shape[0], "forward")
        y = sim.device.matmul(qx, (qw if stored is None else stored).T, scheme=scheme, also=bias,
                              writeback="fused" if top and not ops.y_read else "handoff",
                              consumer=sim.consumer(layer.name, "forward") if to_quantizer else None,
                              a_im2col=layer.im2col, b_sums_known=True, name=f"{layer.name}.output")
        sim.handoffs[layer.name] = sim.device.last_handoff
        sim.device.record(ops.forward, f"{layer.name}.between")
        ctx.qx, ctx.qw, ctx.w64, ctx.layer, ctx.im2col = qx, qw, w64, layer, layer.im2col
        return torch.from_numpy(y).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        qx, qw, layer = ctx.qx, ctx.qw, ctx.layer
        sim, config = layer.sim, layer.sim.config
        need_dx = ctx.needs_input_grad[0]
        if config.mode == "qat":  # straight-through: float backward with the quantized operands
            x_q, w_q = (torch.from_numpy(q.dequantize()).to(dy.dtype) for q in (qx, qw))
            dx = _fold((dy @ w_q).double().numpy(), ctx.im2col) if need_dx else None
            return None if dx is None else torch.from_numpy(dx).to(dy.dtype), dy.t() @ x_q, None
        dy64 = dy.detach().double().numpy()
        if layer.name == sim.top:   # the loss gradient: each sample's (p_i - y_i) / batch
            samples = dy64.shape[0] // layer.rows_per_sample
            sim.loss_norms = np.linalg.norm(dy64.reshape(samples, -1), axis=1) * samples
        if sim.probe is not None:   # for variance analysis: what this layer's backward saw
            sim.probe[layer.name] = {"dy": dy64, "x": qx.dequantize(), "w": qw.dequantize(),
                                     "rows_per_sample": layer.group_rows}
        dx, wide_at = None, None
        producer = sim.producer(layer.name)
        batch = dy64.shape[0] // layer.rows_per_sample
        ops = sim.around(layer.name, batch)   # before the quantizers observe
        sim.device.record(ops.backward, f"{layer.name}.between_grad")
        if ops.dy_wide:   # the pass between (or the loss's) stored dY at full width
            dy64 = sim.wide(dy64)
        if need_dx:
            below = sim.around(sim.below(layer.name), batch)
            q, scheme = sim.quantize(f"{layer.name}.grad_input", dy64, config.quantizer,
                                     config.grad_bits, layer.group_rows, producer=producer,
                                     coded=ops.dy_coded)
            to_quantizer = not (below.dz_read or below.dy_coded)
            if q.rotation is not None:   # hadamard: W's codes rotated by dY's R, cancelling it
                qw = rotate_weight(ctx.w64, q.rotation, FORWARD_BITS)
            out = sim.device.matmul(q, qw, scheme=scheme, writeback="handoff",
                                    col2im=ctx.im2col, b_sums_known=True,
                                    name=f"{layer.name}.grad_input",
                                    consumer=sim.consumer(layer.name, "backward")
                                    if to_quantizer else None)
            dx = torch.from_numpy(_fold(out, ctx.im2col)).to(dy.dtype)
            wide_at = sim.device.last_gradient_level if scheme.materializes else None
        q, scheme = sim.quantize(f"{layer.name}.grad_weight", dy64.T,
                                 weight_gradient_method(config.quantizer), GRAD_WEIGHT_BITS,
                                 shared_at=wide_at, producer=by_columns(producer),
                                 coded=ops.dy_coded)
        bias = 0 if layer.bias is None else layer.bias.numel()
        dw = sim.device.matmul(q, qx, scheme=scheme, writeback="materialized",
                               b_im2col=ctx.im2col, name=f"{layer.name}.grad_weight",
                               also=bias_events(dy64.shape[0], dy64.shape[1], "backward")
                               if bias else None)
        sim.device.update(qw.codes.size, name=f"{layer.name}.update", state_at=sim.state_at,
                          sums=2 if need_dx else 1, bias=bias, formats=sim.formats,
                          channels=qw.codes.shape[0], rotated=qw.rotation is not None)
        return dx, torch.from_numpy(dw).to(dy.dtype), None


class FQTLinear(nn.Module):
    """nn.Linear with its GEMMs on the simulated device; shares the original parameters. An
    input of sequences (batch x tokens x features) is one GEMM row per token, each token a
    group of its own for PSQ and BHQ."""
    rows_per_sample = 1   # GEMM rows per sample: the tokens of the last input's sequences
    group_rows = 1        # rows a per-sample gradient quantizer ranges together
    im2col = None

    def __init__(self, linear: nn.Linear, sim: Simulator, name: str):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.sim, self.name = sim, name

    def forward(self, x):
        self.rows_per_sample = x.shape[1] if x.dim() == 3 else 1
        y = _FQTMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self)   # (M, in) -> (M, out)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class FQTConv2d(nn.Module):
    """nn.Conv2d as im2col + an FQT GEMM; shares the original parameters. As the hardware does,
    the input map is quantized once and its codes unfolded into im2col rows, and grad_input's
    rows are folded back onto the map (col2im); the device charges the im2col matrix as built
    on chip from the map (`im2col`, the last batch's geometry) and that fold."""

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

    @property
    def group_rows(self) -> int:   # PSQ and BHQ range a sample's positions together
        return self.rows_per_sample

    def forward(self, x):
        n, c, h, w = x.shape
        self.im2col = Im2col(n, c, h, w, self.kernel_size, self.stride, self.padding)
        oh, ow = self.im2col.out_h, self.im2col.out_w
        self.rows_per_sample = oh * ow
        y = _FQTMatmul.apply(x, self.weight.reshape(self.weight.shape[0], -1), self)  # (N*L, out)
        y = y.reshape(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow)
        return y if self.bias is None else y + self.bias[None, :, None, None]

    @property
    def padded(self) -> bool:
        return any(self.padding)

    def unfold_codes(self, q: Quantized, naught) -> Quantized:
        """The im2col rows of the input map's codes `q`, the padding coded as 0.0 (`naught`):
        the codes the rows themselves would have, from one quantization of the map."""
        g = self.im2col
        n, c, h, w = g.samples, g.channels, g.in_h, g.in_w
        rows = np.empty((self.im2col.rows, self.im2col.cols), q.codes.dtype)
        fill = 0 if naught is None else naught
        unfold_codes(q.codes.reshape(n, c, h, w), g.kernel, g.stride, g.padding,
                     q.codes.dtype.type(fill), rows)
        return replace(q, codes=rows)


def _fold(rows: np.ndarray, im2col: Im2col | None) -> np.ndarray:
    """The gradient of a layer's input from that of its GEMM operand: a conv's im2col rows
    folded onto its input map (col2im), a Linear's as it is."""
    if im2col is None:
        return rows
    g = im2col
    return fold_rows(rows, g.samples, g.channels, g.in_h, g.in_w, g.kernel, g.stride, g.padding)


def convert(model: nn.Module, sim: Simulator) -> nn.Module:
    """Swap every nn.Linear and nn.Conv2d of `model`, in place, for its FQT twin (a no-op in
    fp32 mode), and every module that names its own twin (`fqt(sim, name)`: a product of two
    activations, an embedding; see `fqtsim.training.gpt`); other modules stay float. Returns the
    model."""
    if sim.config.mode == "fp32":
        return model
    # depth first, in the order the modules were defined: forward order (an nn.Sequential, or
    # a model that defines its modules in the order it runs them); the last one is the top
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear):
            twin = FQTLinear(child, sim, name)
        elif isinstance(child, nn.Conv2d):
            twin = FQTConv2d(child, sim, name)
        elif hasattr(child, "fqt"):
            twin = child.fqt(sim, name)
        else:
            continue
        parent, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent), child_name, twin)
        sim.top = name
        sim.bottom = sim.bottom or name
        sim.order.append(name)
    return model
