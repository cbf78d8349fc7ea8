"""The quantization noise of an FQT backward pass, and its exact expected variance per layer.

Given the forward pass, every map between the gradient quantizers is linear in the gradient it
carries (dX = dY W~, a conv's col2im, ReLU's mask, BatchNorm's backward at the batch's
statistics), and stochastic rounding floor(y + u) adds to each element of a quantizer's input,
given that input, an independent zero-mean error of variance

    var(e) = scale^2 f (1 - f),   f the element's fractional part in code units

(BHQ: of the transformed element; its error reaches dY through T^-1). Each quantizer's error is
zero-mean given everything above it, so errors of different quantizers are uncorrelated and the
expected squared error of layer l's weight gradient dW_l = Q_bw(dY_l)^T X~_l is

    E||dW_l - dW_l^QAT||^2 = sum_q sum_e var(e) ||K_q e||^2

over Q_bw of layer l and Q_ba of every layer above, K_q the linear map from quantizer q's error to
dW_l. How each term is found:

- Q_bw: the error sits in the GEMM's operand, so K e = e x_m: var(e) ||x_m||^2. Closed form.
- Q_ba through Linear layers with only ReLU (or Flatten) between: each sample's row maps on its
  own, dY_l[m] = e_m A_m. Carrying one indicator per column c of e gives every A_m[c] at once;
  the term is sum var(e_mc) ||A_m[c]||^2 ||x_m||^2 (BHQ: the Gram of those rows within each block
  of T^-1). Closed form.
- Q_ba through BatchNorm (which couples the samples) or a conv's col2im: Hutchinson probes. For
  Rademacher z (E z z^T = I), E_z ||K (sqrt(var) . z)||^2 = sum_e var(e) ||K e||^2: the estimate is
  the mean over probes, unbiased, with standard error std / sqrt(probes).

The variances are those of the inputs each quantizer saw in this pass (below the top layer they
carry the errors of the quantizers above); averaged over passes they estimate the expected
variance of FQT's gradient about QAT's, which is what repeated passes measure.

`track` measures, during training, each layer's quantization variance against its minibatch
sampling variance without touching what the run does next.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fqtsim.training.fqt import FQTConfig, FQTConv2d, FQTLinear, Simulator

PER_SAMPLE = (nn.ReLU, nn.Flatten, nn.Identity)   # between-layer ops that keep samples apart
BETWEEN = (*PER_SAMPLE, nn.BatchNorm1d, nn.BatchNorm2d)   # the ops whose backward maps it follows
HUTCHINSON_PROBES = 8   # per quantizer and pass, where the map to a layer is probed


@dataclass
class Layer:
    """An FQT layer of a model and the float ops between the layer below's output and its input."""
    module: FQTLinear | FQTConv2d
    between: list

    @property
    def name(self) -> str:
        return self.module.name


def layers(model: nn.Sequential) -> list[Layer]:
    """`model`'s FQT layers, bottom up, each with the ops just below it; a model whose backward
    this module cannot follow is refused."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"quantization variance: follows an nn.Sequential of FQT layers (the MLPs "
                         f"and the CNN); got {type(model).__name__}")
    found, between = [], []
    for module in model:
        if isinstance(module, (FQTLinear, FQTConv2d)):
            found.append(Layer(module, between))
            between = []
        elif isinstance(module, BETWEEN):
            between.append(module)
        else:
            raise ValueError(f"quantization variance: no backward map for "
                             f"{type(module).__name__}; supported between FQT layers: ReLU, "
                             f"Flatten, BatchNorm")
    if not found:
        raise ValueError("model: no FQT layers; convert it first (fqtsim.training.fqt.convert)")
    return found


class Forward:
    """Records what the ops between FQT layers saw in the last forward pass (their input,
    float64): ReLU's mask, BatchNorm's statistics and Flatten's shape come from it."""

    def __init__(self, model: nn.Sequential):
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self._hooks = [m.register_forward_hook(self._keep) for layer in layers(model)
                       for m in layer.between]

    def _keep(self, module, inputs, _):
        self.inputs[module] = inputs[0].detach().double()

    def remove(self):
        for hook in self._hooks:
            hook.remove()

    def bn_sigma(self, module) -> torch.Tensor:
        """A BatchNorm's per-channel sigma in this pass (batch statistics in train mode)."""
        if not module.training:
            return torch.sqrt(module.running_var.double() + module.eps)
        x = self.inputs[module]
        return torch.sqrt(x.var(dim=_channel_dims(x), unbiased=False) + module.eps)


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))   # samples and positions: all but the channels


@dataclass
class Terms:
    """A layer's expected quantization variance, and the first two steps the paper's bound takes
    from it: `worst`, with SR's variance at its worst (bin^2 / 4 for f (1 - f)); `spectral`,
    `worst` with ||(J e)^T X~||^2 replaced by ||X~||_2^2 ||J e||^2 (J e: the error that a
    quantizer's element e puts into this layer's dY)."""
    exact: float = 0.0
    worst: float = 0.0
    spectral: float = 0.0


def sr_variance(x: np.ndarray, q) -> tuple[np.ndarray, np.ndarray]:
    """For quantizer output `q` of input `x`: each element's SR variance given x, and SR's worst
    case bin^2 / 4 (0 in a constant group, which is exact), both in q's own basis (BHQ:
    transformed)."""
    if q.clipped:
        raise ValueError(f"{q.clipped} values fell outside a delayed range and were clipped: "
                         f"clipping biases the gradient and its variance is not SR's; measure "
                         f"with dynamic ranges")
    z = x if q.transform is None else q.transform.apply(x)
    if q.block is not None:   # mxint: each block's bin is its power-of-two scale
        scale = np.repeat(q.scale, q.block, axis=1)[:, :z.shape[1]]
        f = z / scale - np.floor(z / scale)
        return scale**2 * f * (1 - f), scale**2 / 4
    codes = (z - q.offset) / q.scale
    f = codes - np.floor(codes)
    top = (1 << q.bits) - 1
    return q.scale**2 * f * (1 - f), np.broadcast_to((q.ranges / top) ** 2 / 4, z.shape)


def expected_variance(model_layers: list[Layer], probe: dict, forward: Forward,
                      rng: np.random.Generator,
                      probes: int = HUTCHINSON_PROBES) -> dict[str, Terms]:
    """Each layer's `Terms` for the backward pass `probe` kept (`Simulator.probe`: every layer's
    operands and every gradient quantizer's input and output), the forward pass `forward`
    recorded; `rng` draws the Hutchinson probes (`probes` per quantizer where needed)."""
    if probes < 1:
        raise ValueError(f"probes: got {probes}; expected at least 1")
    terms = {layer.name: Terms() for layer in model_layers}
    x = {layer.name: torch.from_numpy(probe[layer.name]["x"]) for layer in model_layers}
    x_norm2 = {name: float(torch.linalg.matrix_norm(v, 2)) ** 2 for name, v in x.items()}
    row_norm2 = {name: (v**2).sum(1).numpy() for name, v in x.items()}
    for layer in model_layers:   # Q_bw: its error e at (c, m) adds e x_m to row c of dW
        t, (dy_t, q) = terms[layer.name], probe[layer.name]["grad_weight"]
        var, worst = sr_variance(dy_t, q)
        t.exact += float((var @ row_norm2[layer.name]).sum())
        t.worst += float((worst @ row_norm2[layer.name]).sum())
        t.spectral += x_norm2[layer.name] * float(worst.sum())
    for j in range(1, len(model_layers)):   # Q_ba of layer j (the bottom layer computes no dX)
        top = model_layers[j]
        dy, q = probe[top.name]["grad_input"]
        var, worst = sr_variance(dy, q)
        rows, cols = var.shape
        # one indicator per column: carried through per-sample maps it gives every A_m[c]
        unit = torch.eye(cols, dtype=torch.float64)[:, None, :].expand(cols, rows, cols) \
            if isinstance(top.module, FQTLinear) else None
        pairs = None
        if not all(_per_sample(model_layers, i) for i in range(1, j + 1)):
            z = torch.from_numpy(rng.choice([-1.0, 1.0], (probes, rows, cols)))
            pairs = torch.cat([_original_basis(q, z * torch.from_numpy(np.sqrt(s)))
                               for s in (var, worst)])   # (2 probes, rows, cols)
        for l in range(j - 1, -1, -1):
            below = model_layers[l]
            unit = _down(model_layers, l + 1, unit, probe, forward) \
                if unit is not None and _per_sample(model_layers, l + 1) else None
            pairs = _down(model_layers, l + 1, pairs, probe, forward) if pairs is not None else None
            t, x_below = terms[below.name], x[below.name]
            if unit is not None:
                exact, worst_sr, spectral = _closed_form(unit, var, worst, q, x_below,
                                                         row_norm2[below.name])
            else:   # dW per probe (2 probes, N, K): the first half carries var, the rest worst
                dw = torch.einsum("pmn,mk->pnk", pairs, x_below)
                exact, worst_sr = (float((half**2).sum((1, 2)).mean())
                                   for half in dw.split(probes))
                spectral = float((pairs[probes:] ** 2).sum((1, 2)).mean())
            t.exact += exact
            t.worst += worst_sr
            t.spectral += x_norm2[below.name] * spectral
    return terms


def _per_sample(model_layers: list[Layer], i: int) -> bool:
    """Whether the map from layer i's dY to layer i-1's keeps each sample's row to itself."""
    return all(isinstance(model_layers[k].module, FQTLinear) for k in (i - 1, i)) and \
        all(isinstance(m, PER_SAMPLE) for m in model_layers[i].between)


def _original_basis(q, noise: torch.Tensor) -> torch.Tensor:
    """Errors (probes, rows, cols) in q's basis as they reach dY: through T^-1 for BHQ, which
    mixes rows (samples) alike in every column, so the probes ride along as columns."""
    if q.transform is None:
        return noise
    p, m, n = noise.shape
    flat = noise.permute(1, 0, 2).reshape(m, p * n).numpy()
    return torch.from_numpy(q.transform.inverse(flat)).reshape(m, p, n).permute(1, 0, 2)


def _closed_form(unit, var, worst, q, x, row_norm2) -> tuple[float, float, float]:
    """The Q_ba terms for per-sample maps: unit[c, m] = A_m[c], the row that the error at (m, c)
    puts into dY_l."""
    a2 = (unit**2).sum(-1).numpy().T   # (rows, cols): ||A_m[c]||^2
    if q.transform is None:
        return (float((var * a2 * row_norm2[:, None]).sum()),
                float((worst * a2 * row_norm2[:, None]).sum()), float((worst * a2).sum()))
    # BHQ: the error at transformed row k reaches rows m with weights t = T^-1[:, k], inside k's
    # block only. In dY_l those rows stay apart: ||J e_kc||^2 = sum_m t_m^2 ||A_m[c]||^2; in dW_l
    # they add up: ||K e_kc||^2 = t^T ((A_c A_c^T) . (X X^T)) t over the block
    inverse = q.transform.inverse(np.eye(len(var)))
    exact = worst_sr = spectral = 0.0
    for block in q.transform.blocks:
        t = torch.from_numpy(inverse[np.ix_(block, block)])            # (n, n)
        rows = torch.from_numpy(np.asarray(block))
        a = unit[:, rows]                                             # (cols, n, N_l)
        gram = (a @ a.transpose(1, 2)) * (x[rows] @ x[rows].T)        # (cols, n, n)
        with_x = torch.einsum("mk,cmp,pk->kc", t, gram, t).numpy()    # (n, cols)
        without = torch.einsum("mk,cm->kc", t**2, (a**2).sum(-1)).numpy()
        exact += float((var[block] * with_x).sum())
        worst_sr += float((worst[block] * with_x).sum())
        spectral += float((worst[block] * without).sum())
    return exact, worst_sr, spectral


def _down(model_layers: list[Layer], i: int, g: torch.Tensor, probe: dict,
          forward: Forward) -> torch.Tensor:
    """Gradients `g` (probes, rows, N) at layer i's output, carried to layer i-1's output rows:
    through W~_i, col2im (a conv), and the ops between, at this forward pass."""
    module = model_layers[i].module
    g = g @ torch.from_numpy(probe[module.name]["w"])                     # (P, rows, K)
    p = g.shape[0]
    if isinstance(module, FQTConv2d):   # im2col rows (n L, C k k) folded onto the input map
        geo = module.im2col   # this forward pass's
        n, c, h, w = geo.samples, geo.channels, geo.in_h, geo.in_w
        cols = g.reshape(p * n, -1, g.shape[-1]).transpose(1, 2)          # (P n, C k k, L)
        g = F.fold(cols, (h, w), geo.kernel, padding=geo.padding,
                   stride=geo.stride).reshape(p, n, c, h, w)
    for op in reversed(model_layers[i].between):
        g = _op_backward(op, g, forward)
    below = model_layers[i - 1].module
    if isinstance(below, FQTConv2d):   # (P, n, C, oh, ow) -> its im2col output rows (P, n L, C)
        g = g.reshape(p, g.shape[1], g.shape[2], -1).transpose(2, 3).reshape(p, -1, g.shape[2])
    return g


def _op_backward(op: nn.Module, g: torch.Tensor, forward: Forward) -> torch.Tensor:
    """The backward map of a float op between FQT layers, for gradients (probes, *its output)."""
    x = forward.inputs[op]
    if isinstance(op, nn.ReLU):
        return g * (x > 0)
    if isinstance(op, (nn.Flatten, nn.Identity)):
        return g.reshape(g.shape[0], *x.shape)
    if isinstance(op, (nn.BatchNorm1d, nn.BatchNorm2d)):
        shape = (1, 1, -1) + (1,) * (x.dim() - 2)   # per channel, against (P, n, C, ...)
        sigma = forward.bn_sigma(op).reshape(shape)
        gamma = op.weight.detach().double().reshape(shape) if op.affine else 1.0
        g = g * gamma / sigma
        if not op.training:
            return g
        # batch statistics: dx = (g - mean g - xhat mean(g xhat)) / sigma, means over the batch
        dims = [d + 1 for d in _channel_dims(x)]
        mean = x.mean(dim=_channel_dims(x), keepdim=True)[None]
        xhat = (x[None] - mean) / sigma
        return g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)
    raise ValueError(f"quantization variance: no backward map for {type(op).__name__}; "
                     f"supported between FQT layers: ReLU, Flatten, BatchNorm")


def weight_gradients(model: nn.Module, sim: Simulator, x, y) -> dict[str, np.ndarray]:
    """Each FQT layer's weight gradient (float64) for one batch, the device's events dropped."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sim.device.take()
    return {layer.name: layer.module.weight.grad.double().numpy().copy()
            for layer in layers(model)}


def sampling_variance(model: nn.Module, sim: Simulator, batches: list) -> dict[str, float]:
    """Per layer, the minibatch sampling variance of the QAT weight gradient, E||g_b - E g||^2
    over `batches` (at least two); `sim` is left in QAT mode."""
    if len(batches) < 2:
        raise ValueError(f"batches: got {len(batches)}; a sampling variance needs at least two")
    sim.config = FQTConfig("qat")
    per_batch = [weight_gradients(model, sim, x, y) for x, y in batches]
    sampling = {}
    for name in per_batch[0]:
        grads = np.stack([g[name] for g in per_batch])                # (batches, *weight)
        sampling[name] = float(((grads - grads.mean(0)) ** 2).sum() / len(grads))
    return sampling


TRACK_BATCHES = 16   # batches of the sampling variance (fewer where the training set is small)
TRACK_DRAWS = 4      # backward passes of the quantization variance, on the first batch


def track(model: nn.Module, sim: Simulator, batches: list, quantizer: str, grad_bits: int,
          rng: np.random.Generator, draws: int = TRACK_DRAWS) -> dict[str, tuple[float, float]]:
    """Per layer, (expected quantization variance of FQT with `quantizer` at `grad_bits`, dynamic
    ranges, on batches[0]; sampling variance over `batches`), for the model as it is now.

    What the run does next is untouched: the model's buffers (BatchNorm's running statistics)
    and mode, the simulator's config, random stream, range histories and device state are
    restored, the device's events dropped; stochastic rounding and probes draw from `rng`."""
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    saved_config, saved_rng, saved_state = sim.config, sim.rng, sim.state()
    forward = Forward(model)
    try:
        model.train()
        sampling = sampling_variance(model, sim, batches)
        # the run's own PTQ ranges (--ptq-range), dynamic
        sim.config = FQTConfig("fqt", quantizer, grad_bits, ptq_range=saved_config.ptq_range)
        sim.rng = rng
        model_layers, x, y = layers(model), *batches[0]
        quantization = {layer.name: 0.0 for layer in model_layers}
        for _ in range(draws):
            sim.probe = {}
            weight_gradients(model, sim, x, y)
            for name, t in expected_variance(model_layers, sim.probe, forward, rng).items():
                quantization[name] += t.exact / draws
        return {name: (quantization[name], sampling[name]) for name in quantization}
    finally:
        forward.remove()
        sim.probe = None
        sim.config, sim.rng = saved_config, saved_rng
        sim.restore(saved_state)
        sim.device.take()
        model.load_state_dict(saved_model)
        model.train(was_training)
        model.zero_grad()
