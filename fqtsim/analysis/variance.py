"""Gradient variance on the integer device: measured, exact, and against the paper's bound.

For a trained model and fixed batches, per layer (the weight gradient):
- sampling: the minibatch sampling variance of the QAT gradient, E||g_b - E g||^2 over batches;
- empirical: the quantization variance of FQT, E||g_fqt - g_qat||^2 over repeated backward passes
  on one batch (the forward pass is deterministic, and FQT is unbiased, so g_qat is its mean),
  with its Monte-Carlo standard error `empirical_se`;
- exact: the same expectation computed from each pass's quantizer inputs, sum_e var(e) ||K e||^2
  with var(e) = scale^2 f (1 - f) (`fqtsim.training.noise`: closed form through Linear and ReLU,
  Hutchinson probes through BatchNorm and a conv's col2im), averaged over the passes, with the
  standard error of that average `exact_se`;
- bound: the quantizers' variance bounds carried to the weight gradient by operator norms, as in
  the paper's variance theorem. The noise a quantizer adds to dY_j reaches dY_l (l < j) through
  every layer between: dX_i = dY_i W_i (norm ||W_i||), the im2col fold of a conv (norm at most
  sqrt(kh kw)), BatchNorm (at most max |gamma| / sigma) and ReLU (at most 1). Noises of different
  quantizers are zero-mean given their input, so their variances add:
      Var[dW_l] <= ||X_l||^2 (sum_{j>l} G_lj^2 V_j + U_l),   G_lj = prod_{i=l+1..j} ||W_i|| fold_i a_i
  with V_j the bound of Q_ba on dY_j and U_l of Q_bw on dY_l (SR's bin^2 / 4 per element), each
  taken on the (noisy) tensor the quantizer actually saw and averaged over the passes. It must
  hold; `tightness` (bound / empirical) and `bound_over_exact` say how loose it is;
- statistical: the same chain with every spectral norm replaced by its mean-square counterpart,
  the gain on noise spread evenly and independently over a map's inputs: ||X_l||_F^2 / rows for
  ||X_l||_2^2, ||W_i||_F^2 / N_i for ||W_i||_2^2, the active fraction for ReLU, the mean of
  (gamma / sigma)^2 for BatchNorm, the share of im2col entries off the padding for col2im (each
  lands on one pixel). An estimate of the bound's shape under independence, not a guarantee.

bound / exact splits into three factors, each the step from one quantity to the next:
  sr_factor    SR's worst case bin^2 / 4 in place of each element's f (1 - f);
  x_factor     ||X_l||_2^2 ||J e||^2 in place of the actual contraction ||(J e)^T X_l||^2 (the
               paper's "largest eigenvalue" step; J e the error a quantizer puts into dY_l);
  norm_factor  the operator norms of the layers between in place of the actual ||J e||.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from fqtsim.training.fqt import FQTConfig, FQTConv2d, Simulator
from fqtsim.training.noise import (HUTCHINSON_PROBES, Forward, expected_variance, layers,
                                   sampling_variance, weight_gradients)
from fqtsim.quantizers import GRADIENT_METHODS, variance_bound
from fqtsim.simulation.schedule import GRAD_WEIGHT_BITS, weight_gradient_method

log = logging.getLogger(__name__)

# What `run` uses when no --run is given (with --run, the run's own model, dataset and seed).
DEFAULTS = {"model": "mlp", "dataset": "digits", "epochs": 3, "seed": 0}
# the quantizers measured: hadamard's error lives in its rotated basis, which the exact
# variance (fqtsim.training.noise) does not carry through R^T
METHODS = tuple(q for q in GRADIENT_METHODS if q != "hadamard")


def _op_gains(module: nn.Module, forward: Forward) -> tuple[float, float]:
    """(operator norm, mean-square gain) of a float op's backward map, at this forward pass."""
    if isinstance(module, (nn.Flatten, nn.Identity)):
        return 1.0, 1.0
    if isinstance(module, nn.ReLU):
        return 1.0, float((forward.inputs[module] > 0).double().mean())
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        gamma = module.weight.detach().abs().double() if module.affine else 1.0
        ratio = gamma / forward.bn_sigma(module)
        return float(ratio.max()), float((ratio**2).mean())
    raise ValueError(f"variance bound: no Jacobian norm for {type(module).__name__}; "
                     f"supported between FQT layers: ReLU, Flatten, BatchNorm")


def _fold_gains(module) -> tuple[float, float]:
    """col2im's (operator norm, mean-square gain): each input pixel gets at most kh * kw
    contributions; each im2col entry lands on one pixel, unless it lies on the padding."""
    if not isinstance(module, FQTConv2d):
        return 1.0, 1.0
    g = module.im2col
    kept = F.unfold(torch.ones(1, g.channels, g.in_h, g.in_w, dtype=torch.float64), g.kernel,
                    padding=g.padding, stride=g.stride).mean()
    return math.sqrt(math.prod(g.kernel)), float(kept)


def _norms(model_layers, probe: dict, forward: Forward) -> dict:
    """The norms both bounds take, from one pass (the forward pass is the same every draw):
    per layer, ||X||_2^2 and ||X||_F^2 / rows, and the spectral and mean-square gains of the map
    from its dY to the dY of the layer below."""
    out = {}
    for layer in model_layers:
        x, w = probe[layer.name]["x"], probe[layer.name]["w"]
        ops = [_op_gains(m, forward) for m in layer.between] + [_fold_gains(layer.module)]
        out[layer.name] = {
            "x_spectral": np.linalg.norm(x, 2) ** 2, "x_mean_square": (x**2).sum() / len(x),
            "gain": np.linalg.norm(w, 2) * math.prod(op for op, _ in ops),
            "gain_mean_square": (w**2).sum() / len(w) * math.prod(ms for _, ms in ops)}
    return out


def _carried(model_layers, idx: int, norms: dict, v_ba: dict, u_bw: dict, spectral: bool) -> float:
    """A bound on layer idx's weight-gradient variance: the quantizers' bounds carried to it with
    operator norms (`spectral`) or mean-square gains."""
    gain, x_gain = ("gain", "x_spectral") if spectral else ("gain_mean_square", "x_mean_square")
    name = model_layers[idx].name
    carried, g = 0.0, 1.0
    for j in range(idx + 1, len(model_layers)):
        above = model_layers[j].name
        g *= norms[above][gain] ** (2 if spectral else 1)   # mean-square gains are squares already
        carried += g * np.mean(v_ba[above])
    return float(norms[name][x_gain] * (carried + np.mean(u_bw[name])))


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _mean_se(values: list) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def measure(model: nn.Sequential, sim: Simulator, batches: list, quantizers=("ptq", "psq", "bhq"),
            bits=range(2, 9), draws: int = 32, progress: bool = True, seed: int = 0,
            probes: int = HUTCHINSON_PROBES) -> pd.DataFrame:
    """The table described above for an FQT-converted `model` (its layers share `sim`).

    `seed`: of the Hutchinson probes (stochastic rounding draws from `sim`'s stream); `probes`:
    per quantizer and pass where the map to a layer is probed. `progress`: a bar over the
    backward passes on a terminal, else a log line per (quantizer, bits) point."""
    model_layers = layers(model)
    forward = Forward(model)
    probe_rng = np.random.default_rng(seed)
    block = sim.device.hw.pipeline.block   # mxint's values per scale
    try:
        model.train()
        sampling = sampling_variance(model, sim, batches)
        x, y = batches[0]
        reference = weight_gradients(model, sim, x, y)
        rows, norms = [], None
        points = [(quantizer, b) for quantizer in quantizers for b in bits]
        bar = tqdm(total=len(points) * draws, desc="variance", unit="pass",
                   disable=None if progress else True)   # None: on a terminal only
        started = time.perf_counter()
        for point, (quantizer, b) in enumerate(points, start=1):
            sim.config = FQTConfig("fqt", quantizer, b)
            bar.set_postfix_str(f"{quantizer} {b}-bit")
            seen = defaultdict(lambda: defaultdict(list))   # layer -> quantity -> per pass
            for _ in range(draws):
                bar.update()
                sim.probe = {}
                grads = weight_gradients(model, sim, x, y)
                terms = expected_variance(model_layers, sim.probe, forward, probe_rng, probes)
                norms = norms or _norms(model_layers, sim.probe, forward)
                for layer in model_layers:
                    name, kept, mine = layer.name, sim.probe[layer.name], seen[layer.name]
                    mine["error"].append(((grads[name] - reference[name]) ** 2).sum())
                    for quantity in ("exact", "worst", "spectral"):
                        mine[quantity].append(getattr(terms[name], quantity))
                    if "grad_input" in kept:   # Q_ba (on dY grouped per sample, as it ranges)
                        dy = kept["grad_input"][0]
                        grouped = dy if quantizer == "mxint" else \
                            dy.reshape(-1, kept["rows_per_sample"] * dy.shape[1])
                        mine["v_ba"].append(variance_bound(grouped, quantizer, b, block))
                    mine["u_bw"].append(variance_bound(kept["grad_weight"][0],
                                                       weight_gradient_method(quantizer),
                                                       GRAD_WEIGHT_BITS, block))
            v_ba = {name: s["v_ba"] for name, s in seen.items()}
            u_bw = {name: s["u_bw"] for name, s in seen.items()}
            for idx, layer in enumerate(model_layers):
                mine = seen[layer.name]
                bound = _carried(model_layers, idx, norms, v_ba, u_bw, spectral=True)
                statistical = _carried(model_layers, idx, norms, v_ba, u_bw, spectral=False)
                empirical, empirical_se = _mean_se(mine["error"])
                exact, exact_se = _mean_se(mine["exact"])
                worst, spectral = np.mean(mine["worst"]), np.mean(mine["spectral"])
                rows.append({"layer": layer.name, "quantizer": quantizer, "bits": b,
                             "sampling": sampling[layer.name], "empirical": empirical,
                             "empirical_se": empirical_se, "exact": exact, "exact_se": exact_se,
                             "bound": bound, "statistical": statistical,
                             "tightness": _ratio(bound, empirical),
                             "bound_over_exact": _ratio(bound, exact),
                             "empirical_over_exact": _ratio(empirical, exact),
                             "sr_factor": _ratio(worst, exact),
                             "x_factor": _ratio(spectral, worst),
                             "norm_factor": _ratio(bound, spectral), "draws": draws})
            if progress and bar.disable:
                log.info(f"variance: {point}/{len(points)} {quantizer} {b}-bit done, "
                         f"{time.perf_counter() - started:.0f} s")
        bar.close()
        return pd.DataFrame(rows)
    finally:
        sim.probe = None
        forward.remove()


def plot(table: pd.DataFrame, path):
    """Variance against bits per layer: measured (solid), exact (crosses), bound (dashed),
    statistical (dotted), QAT sampling (grey)."""
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
            ax.plot(group.bits, group.exact, "x", color="black", ms=7,
                    label="exact" if i == 0 else None)
            ax.plot(group.bits, group.bound, "--", color=color, label=f"{quantizer} bound")
            ax.plot(group.bits, group.statistical, ":", color=color,
                    label=f"{quantizer} statistical")
        ax.axhline(part.sampling.iloc[0], color="grey", lw=2, alpha=0.6, label="QAT sampling")
        ax.set(yscale="log", xlabel="gradient bits", title=f"layer {name}")
    axes[0][0].set_ylabel("variance of the weight gradient")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))   # off the data
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
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
    from fqtsim.training.models import CONV_MODELS, MODELS, build
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
    if model == "gpt":   # its products of activations keep no probe for the noise model
        raise ValueError("--model gpt: the variance analysis covers the image models "
                         "(mlp, mlp6, cnn, cnn8)")
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
        if q not in METHODS:
            raise ValueError(f"--quantizer: got {q!r}; expected one of {', '.join(METHODS)}")
    device_hw = load_hw(hw)
    out = claim_dir(out, "variance", inputs=[resolve_hw(hw), *([from_run] if from_run else [])])
    data = load(dataset, seed=seed)
    data = data.as_images() if model in CONV_MODELS else data
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
    table = measure(net, sim, fixed, quantizers, bits, draws, progress=progress, seed=seed)
    table.insert(0, "model", model)
    write_atomic(out / "variance.csv", table.to_csv(index=False))
    png = io.BytesIO()
    plot(table, png)
    write_atomic(out / "variance.png", png.getvalue())
    return table
