"""Gradient variance on the integer device, against its closed-form bound.

For a trained model and fixed batches, per layer (the weight gradient):
- sampling: the minibatch sampling variance of the QAT gradient, E||g_b - E g||^2 over batches;
- empirical: the quantization variance of FQT, E||g_fqt - g_qat||^2 over repeated backward passes
  on one batch (the forward pass is deterministic, and FQT is unbiased, so g_qat is its mean);
- bound: the quantizers' variance bounds carried to the weight gradient by operator norms, as in
  the paper's variance theorem. The noise a quantizer adds to dY_j reaches dY_l (l < j) through
  every layer between: dX_i = dY_i W_i (norm ||W_i||), the im2col fold of a conv (norm at most
  sqrt(kh kw)), BatchNorm (at most max |gamma| / sigma) and ReLU (at most 1). Noises of different
  quantizers are zero-mean given their input, so their variances add:
      Var[dW_l] <= ||X_l||^2 (sum_{j>l} G_lj^2 V_j + U_l),   G_lj = prod_{i=l+1..j} ||W_i|| fold_i a_i
  with V_j the bound of Q_ba on dY_j and U_l of Q_bw on dY_l, each taken on the (noisy) tensor
  the quantizer actually saw and averaged over the passes. It must hold; bound / empirical is how
  loose it is.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from fqtsim.training.fqt import FQTConfig, FQTConv2d, FQTLinear, Simulator
from fqtsim.quantizers import variance_bound
from fqtsim.simulation.schedule import GRAD_WEIGHT_BITS, weight_gradient_method

log = logging.getLogger(__name__)

# What `run` uses when no --run is given (with --run, the run's own model, dataset and seed).
DEFAULTS = {"model": "mlp", "dataset": "digits", "epochs": 3, "seed": 0}


@dataclass
class _Layer:
    module: nn.Module
    between: list       # modules between the previous FQT layer's output and this layer's input


def _layers(model: nn.Sequential) -> list[_Layer]:
    layers, between = [], []
    for module in model:
        if isinstance(module, (FQTLinear, FQTConv2d)):
            layers.append(_Layer(module, between))
            between = []
        else:
            between.append(module)
    return layers


def _jacobian_norm(module: nn.Module, bn_sigma: dict) -> float:
    """An upper bound on the operator norm of a float module's backward map."""
    if isinstance(module, (nn.ReLU, nn.Flatten, nn.Identity)):
        return 1.0
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        gamma = module.weight.detach().abs().double() if module.affine else 1.0
        return float((gamma / bn_sigma[module]).max())
    raise ValueError(f"variance bound: no Jacobian norm for {type(module).__name__}; "
                     f"supported between FQT layers: ReLU, Flatten, BatchNorm")


def _fold(module) -> float:
    """Operator-norm bound of col2im: each input pixel gets at most kh * kw contributions."""
    return math.sqrt(math.prod(module.kernel_size)) if isinstance(module, FQTConv2d) else 1.0


def _weight_grads(model, sim, x, y) -> dict:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sim.device.take()
    return {layer.module.name: layer.module.weight.grad.double().numpy().copy()
            for layer in _layers(model)}


def measure(model: nn.Sequential, sim: Simulator, batches: list, quantizers=("ptq", "psq", "bhq"),
            bits=range(2, 9), draws: int = 32, progress: bool = True) -> pd.DataFrame:
    """The table described above for an FQT-converted `model` (its layers share `sim`).

    `progress`: a bar over the backward passes on a terminal, else a log line per
    (quantizer, bits) point."""
    layers = _layers(model)
    bn_sigma = {}

    def remember_sigma(module, inputs, _):   # BatchNorm's batch statistics in train mode
        x = inputs[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        bn_sigma[module] = torch.sqrt(x.var(dim=dims, unbiased=False) + module.eps)
    hooks = [m.register_forward_hook(remember_sigma) for m in model.modules()
             if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    try:
        model.train()
        sim.config = FQTConfig("qat")
        per_batch = [_weight_grads(model, sim, x, y) for x, y in batches]
        mean = {name: np.mean([g[name] for g in per_batch], axis=0) for name in per_batch[0]}
        sampling = {name: float(np.mean([((g[name] - mean[name]) ** 2).sum() for g in per_batch]))
                    for name in mean}
        x, y = batches[0]
        reference = _weight_grads(model, sim, x, y)
        rows, norms = [], {}   # the forward pass is the same every draw: so are ||X|| and ||W||
        points = [(quantizer, b) for quantizer in quantizers for b in bits]
        bar = tqdm(total=len(points) * draws, desc="variance", unit="pass",
                   disable=None if progress else True)   # None: on a terminal only
        started = time.perf_counter()
        for point, (quantizer, b) in enumerate(points, start=1):
            sim.config = FQTConfig("fqt", quantizer, b)
            bar.set_postfix_str(f"{quantizer} {b}-bit")
            errors, v_ba, u_bw = {}, {}, {}
            for _ in range(draws):
                bar.update()
                sim.probe = {}
                grads = _weight_grads(model, sim, x, y)
                for layer in layers:
                    name, seen = layer.module.name, sim.probe[layer.module.name]
                    errors.setdefault(name, []).append(((grads[name] - reference[name]) ** 2).sum())
                    grouped = seen["dy"].reshape(-1, seen["rows_per_sample"] * seen["dy"].shape[1])
                    v_ba.setdefault(name, []).append(variance_bound(grouped, quantizer, b))
                    u_bw.setdefault(name, []).append(variance_bound(
                        seen["dy"].T, weight_gradient_method(quantizer), GRAD_WEIGHT_BITS))
                    if name not in norms:
                        norms[name] = (np.linalg.norm(seen["x"], 2), np.linalg.norm(seen["w"], 2))
            # gain[i]: how noise in dY_i reaches dY_{i-1}
            gain = [norms[l.module.name][1] * _fold(l.module)
                    * math.prod(_jacobian_norm(m, bn_sigma) for m in l.between) for l in layers]
            for idx, layer in enumerate(layers):
                name = layer.module.name
                carried, g = 0.0, 1.0
                for j in range(idx + 1, len(layers)):
                    g *= gain[j]
                    carried += g ** 2 * np.mean(v_ba[layers[j].module.name])
                bound = norms[name][0] ** 2 * (carried + np.mean(u_bw[name]))
                empirical = float(np.mean(errors[name]))
                rows.append({"layer": name, "quantizer": quantizer, "bits": b,
                             "empirical": empirical, "bound": float(bound),
                             "tightness": float(bound) / empirical if empirical else math.inf,
                             "sampling": sampling[name], "draws": draws})
            if progress and bar.disable:
                log.info(f"variance: {point}/{len(points)} {quantizer} {b}-bit done, "
                         f"{time.perf_counter() - started:.0f} s")
        bar.close()
        return pd.DataFrame(rows)
    finally:
        sim.probe = None
        for hook in hooks:
            hook.remove()


def plot(table: pd.DataFrame, path):
    """Variance against bits per layer: empirical (solid), bound (dashed), QAT sampling (grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(table.layer))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        part = table[table.layer == name]
        for i, (quantizer, group) in enumerate(part.groupby("quantizer", sort=False)):
            color = f"C{i}"
            ax.plot(group.bits, group.empirical, "o-", color=color, label=f"{quantizer} measured")
            ax.plot(group.bits, group.bound, "--", color=color, label=f"{quantizer} bound")
        ax.axhline(part.sampling.iloc[0], color="grey", lw=2, alpha=0.6, label="QAT sampling")
        ax.set(yscale="log", xlabel="gradient bits", title=f"layer {name}")
    axes[0][0].set_ylabel("variance of the weight gradient")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def run(out, hw: str = "hw_configs/npu.yaml", model: str | None = None, dataset: str | None = None,
        epochs: int | None = None, batch_size: int = 64, batches: int = 16, draws: int = 32,
        bits=tuple(range(2, 9)), quantizers=("ptq", "psq", "bhq"), seed: int | None = None,
        from_run: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Train (QAT, `epochs`) or load (`from_run`, a `fqtsim run` directory) a model, then measure
    on `batches` fixed batches; writes variance.csv and variance.png into `out`.

    Without `from_run`, model, dataset, epochs and seed default to `DEFAULTS`; with it, they come
    from the run's config.json, and giving any of them is refused (the trained model fixes
    them). Every option is checked, and the batches counted against the dataset, before any
    training. `progress`: bars on a terminal, else log lines (training: per epoch; measuring:
    per quantizer and width)."""
    import io
    import json
    from pathlib import Path

    from fqtsim.training.data import DATASETS, load
    from fqtsim.simulation.device import Device
    from fqtsim.files import claim_dir, write_atomic
    from fqtsim.training.fqt import convert
    from fqtsim.hardware.hw import load_hw, resolve_hw
    from fqtsim.training.models import MODELS, build
    from fqtsim.quantizers import check_bits
    from fqtsim.training.train import OtherRun, RunConfig, train

    given = {"model": model, "dataset": dataset, "epochs": epochs, "seed": seed}
    if from_run is not None:
        clash = [f"--{k}" for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(f"{', '.join(clash)}: not allowed with --run, whose config.json fixes "
                             f"the model, dataset, seed and training; leave {' and '.join(clash)} "
                             f"out, or drop --run to train a model here")
        saved_path = Path(from_run) / "config.json"
        if not saved_path.is_file() or not (Path(from_run) / "model.pt").is_file():
            raise ValueError(f"--run: {from_run} is not a finished fqtsim run directory (it needs "
                             f"config.json and model.pt); give the --out of a finished fqtsim run")
        try:
            saved = json.loads(saved_path.read_text())
            model, dataset, seed = saved["model"], saved["dataset"], saved["seed"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--run: {saved_path} is not a fqtsim run config ({e})") from None
    else:
        model, dataset, epochs, seed = (v if v is not None else DEFAULTS[k] for k, v in given.items())
    if model not in MODELS:
        raise ValueError(f"--model: got {model!r}; expected one of {', '.join(MODELS)}")
    if dataset not in DATASETS:
        raise ValueError(f"--dataset: got {dataset!r}; expected one of {', '.join(DATASETS)}")
    for option, value, least in (("--batches", batches, 2), ("--draws", draws, 2),
                                 ("--batch-size", batch_size, 1)):
        if value < least:   # a variance needs two samples
            raise ValueError(f"{option}: got {value}; expected at least {least}")
    if not bits or not quantizers:
        raise ValueError("--bits, --quantizer: give at least one of each")
    for b in bits:
        check_bits(b)
    for q in quantizers:
        if q not in ("ptq", "psq", "bhq"):
            raise ValueError(f"--quantizer: got {q!r}; expected ptq, psq or bhq")
    device_hw = load_hw(hw)
    out = claim_dir(out, "variance", inputs=[resolve_hw(hw), *([from_run] if from_run else [])])
    data = load(dataset, seed=seed)
    data = data.as_images() if model == "cnn" else data
    if batches * batch_size > len(data.y_train):
        raise ValueError(f"--batches: {batches} batches of {batch_size} need {batches * batch_size} "
                         f"samples; {dataset} has {len(data.y_train)} for training")
    if from_run is None:
        cfg = RunConfig(hw=hw, mode="qat", model=model, dataset=dataset, epochs=epochs,
                        batch_size=batch_size, seed=seed, out=str(out / "training"))
        try:
            train(cfg, progress=progress)
        except OtherRun:   # this command's own training, from an earlier call with other options
            train(cfg, progress=progress, restart=True)
        from_run = cfg.out
    net = build(model, data.image_shape, data.classes)
    net.load_state_dict(torch.load(Path(from_run) / "model.pt"))
    sim = Simulator(Device(device_hw), FQTConfig("qat"), seed=seed)
    convert(net, sim)
    order = np.random.default_rng(seed).permutation(len(data.y_train))
    fixed = [(torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]))
             for idx in np.split(order[:batches * batch_size], batches)]
    table = measure(net, sim, fixed, quantizers, bits, draws, progress=progress)
    table.insert(0, "model", model)
    write_atomic(out / "variance.csv", table.to_csv(index=False))
    png = io.BytesIO()
    plot(table, png)
    write_atomic(out / "variance.png", png.getvalue())
    return table
