"""Tables and the plot of reports/paper-shape-deep from the runs of reports/paper-shape-deep.sh.

Writes, to reports/paper-shape-deep/: accuracy.csv and accuracy.md (final test accuracy, mean and
std over seeds, per model, quantizer and gradient bits; diverged runs counted apart),
accuracy.png (accuracy against gradient bits per quantizer, error bars one std, fp32 and QAT as
bands), variance-cnn8-b128.csv and variance-cnn-b128.csv (every column of `fqtsim variance`;
accuracy.md tabulates the quantization / sampling variance ratio per layer that chose the
setting), ptq-range-variance.csv (PTQ's rounding variance per layer on the same gradients, with
the affine and with the paper's range), predictor.csv (the tracked runs), and each sweep's
results.csv.
Sweeps not yet run are left out.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/paper-shape-deep")
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "reports/paper-shape-deep")
SWEEPS = {"cnn8-mnist1d": "cnn8 (8 layers, BN) on MNIST-1D",
          "cnn8-mnist1d-paper": "cnn8 (8 layers, BN) on MNIST-1D",
          "cnn-mnist1d": "cnn (3 layers, BN) on MNIST-1D",
          "mlp6-digits": "mlp6 (6 layers) on digits",
          "mlp6-digits-paper": "mlp6 (6 layers) on digits",
          "mlp-digits": "mlp (3 layers) on digits"}
MODELS = ["cnn8 (8 layers, BN) on MNIST-1D", "cnn (3 layers, BN) on MNIST-1D",
          "mlp6 (6 layers) on digits", "mlp (3 layers) on digits"]
ROWS = ["fp32", "qat", "PTQ", "PTQ (paper)", "PSQ", "BHQ"]
BITS = [8, 4, 3, 2]


def markdown(header: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def results() -> pd.DataFrame:
    """Every point of every sweep run so far, with its model's title and its row's name."""
    frames = []
    for name, title in SWEEPS.items():
        path = RUNS / name / "results.csv"
        if not path.exists():
            continue
        frame = finished(pd.read_csv(path), RUNS / name)
        frame.to_csv(OUT / f"{name}-results.csv", index=False)
        frame["title"] = title
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    ranges = frame.get("ptq_range", pd.Series("affine", index=frame.index))
    paper = ranges.fillna("affine") == "paper"
    frame["row"] = frame["mode"].where(frame["mode"] != "fqt", frame.quantizer.str.upper())
    frame.loc[paper, "row"] = "PTQ (paper)"
    frame["bits"] = pd.to_numeric(frame.grad_bits, errors="coerce")
    return frame


def finished(frame: pd.DataFrame, sweep: Path) -> pd.DataFrame:
    """A sweep's results with the points finished since it wrote results.csv (a sweep still
    running, or one stopped) marked done with their accuracy."""
    for i in frame.index[frame.status == "not run"]:
        path = sweep / "points" / frame.at[i, "id"] / "summary.json"
        if path.exists():
            frame.loc[i, ["status", "accuracy"]] = "done", json.loads(path.read_text())["accuracy"]
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, row and bits: runs done, diverged, accuracy mean and std (%, over done runs)."""
    keys = ["title", "row", "bits"]
    done = frame[frame.status == "done"]
    table = done.groupby(keys, dropna=False).accuracy.agg(
        done="count", accuracy_mean=lambda a: 100 * a.mean(),
        accuracy_std=lambda a: 100 * a.std(ddof=0))
    failed = frame[frame.status == "failed"].groupby(keys, dropna=False).size().rename("diverged")
    table = table.join(failed, how="outer").fillna({"done": 0, "diverged": 0}).reset_index()
    return table.astype({"done": int, "diverged": int})


def cell(r) -> str:
    text = f"{r.accuracy_mean:.1f} ± {r.accuracy_std:.1f}" if r.done else "-"
    return text + (f" ({r.diverged} of {r.done + r.diverged} diverged)" if r.diverged else "")


def accuracy_tables(table: pd.DataFrame) -> str:
    parts = []
    for title in MODELS:
        part = table[table.title == title]
        if not len(part):
            continue
        baselines = ", ".join(f"{row if row == 'fp32' else 'QAT'} {cell(r)}"
                              for row in ("fp32", "qat")
                              for r in part[part.row == row].itertuples())
        rows = []
        for row in ROWS[2:]:
            cells = {int(r.bits): cell(r) for r in part[part.row == row].itertuples()}
            if cells:
                rows.append([row, *(cells.get(b, "") for b in BITS)])
        parts += [f"### {title}, batch 128", "", markdown(["gradient bits", *BITS], rows), "",
                  f"Baselines: {baselines}." if baselines else "", ""]
    return "\n".join(parts)


def plot(table: pd.DataFrame):
    """Accuracy against gradient bits (evenly spaced, 8 down to 2), a panel per model; a point
    whose every seed diverged is an x at the panel's foot."""
    titles = [t for t in MODELS if (table.title == t).any()]
    cols = min(2, len(titles))
    rows = -(-len(titles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(titles):]:
        ax.set_visible(False)
    for ax, title in zip(axes.flat, titles):
        part = table[table.title == title]
        for row, colour in (("fp32", "grey"), ("qat", "black")):
            for r in part[part.row == row].itertuples():
                ax.axhspan(r.accuracy_mean - r.accuracy_std, r.accuracy_mean + r.accuracy_std,
                           color=colour, alpha=0.12)
                ax.axhline(r.accuracy_mean, color=colour, lw=1, ls="--",
                           label=f"{'QAT' if row == 'qat' else row} {r.accuracy_mean:.1f}")
        for i, row in enumerate(ROWS[2:]):
            points = part[part.row == row].copy()
            points["x"] = [BITS.index(int(b)) + (i - 1.5) * 0.07 for b in points.bits]
            points = points.sort_values("x")
            trained = points[points.done > 0]
            style = dict(marker="osD^"[i], color=f"C{[0, 0, 2, 1][i]}")
            if len(trained):
                ax.errorbar(trained.x, trained.accuracy_mean, yerr=trained.accuracy_std,
                            capsize=3, label=row, ls=":" if row == "PTQ (paper)" else "-",
                            mfc="none" if row == "PTQ (paper)" else None, **style)
            for r in points[points.done == 0].itertuples():   # every seed diverged
                ax.plot(r.x, 0.02, marker="x", color=style["color"], ms=9, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False)
                ax.annotate(f"{row} diverged", (r.x, 0.06), xycoords=("data", "axes fraction"),
                            ha="right", fontsize=7, color=style["color"])
        ax.set(title=title + ", batch 128", xlabel="gradient bits",
               xticks=range(len(BITS)), xticklabels=BITS, xlim=(-0.4, len(BITS) - 0.6))
        ax.set_ylabel("test accuracy % (mean ± std, 3 seeds)")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(OUT / "accuracy.png", dpi=110)


def variance_table(model: str) -> str:
    path = RUNS / f"variance-{model}-b128" / "variance.csv"
    if not path.exists():
        return ""
    shutil.copy(path, OUT / f"variance-{model}-b128.csv")
    t = pd.read_csv(path, dtype={"layer": str})
    t["ratio"] = t.exact / t.sampling
    layers = sorted(t.layer.unique(), key=int)
    ratio = t.set_index(["quantizer", "bits", "layer"]).ratio
    rows = [[q.upper(), b, *(f"{ratio[q, b, layer]:.3g}" for layer in layers)]
            for q in ("ptq", "psq", "bhq") for b in sorted(t.bits.unique(), reverse=True)]
    return markdown(["Q", "bits", *(f"layer {layer}" for layer in layers)], rows)


def paper_against_affine(bits=(8, 4, 3, 2), batches=4, batch_size=128) -> pd.DataFrame:
    """Per layer of the QAT-trained cnn8 of `fqtsim variance`, the expected stochastic-rounding
    variance E||Q(dY) - dY||^2 of PTQ on the same activation gradients dY (those an FQT backward
    pass with PTQ at that width hands each layer's grad_input quantizer, on `batches` training
    batches), with fqtsim's affine range and with the paper's (0 exact): `noise.sr_variance`."""
    import numpy as np
    import torch
    from torch.nn import functional as F
    from fqtsim import load_hw
    from fqtsim.quantizers import quantize_gradient
    from fqtsim.simulation.device import Device
    from fqtsim.training.data import load
    from fqtsim.training.fqt import FQTConfig, Simulator, convert
    from fqtsim.training.models import build
    from fqtsim.training.noise import sr_variance

    data = load("mnist1d", seed=0).as_images()
    order = np.random.default_rng(0).permutation(len(data.y_train))
    net = build("cnn8", data.image_shape, data.classes)
    net.load_state_dict(torch.load(RUNS / "variance-cnn8-b128" / "training" / "model.pt"))
    rows = []
    for b in bits:
        sim = Simulator(Device(load_hw("hw_configs/npu.yaml")), FQTConfig("fqt", "ptq", b))
        model = build("cnn8", data.image_shape, data.classes)
        model.load_state_dict(net.state_dict())
        convert(model, sim)
        rng = np.random.default_rng([0, b])
        for idx in np.split(order[:batches * batch_size], batches):
            sim.probe = {}
            model.zero_grad()
            F.cross_entropy(model(torch.from_numpy(data.x_train[idx])),
                            torch.from_numpy(data.y_train[idx])).backward()
            sim.device.take()
            for layer, probe in sim.probe.items():
                if "grad_input" not in probe:   # the bottom layer passes no gradient down
                    continue
                dy, _ = probe["grad_input"]
                var = {zero: sr_variance(dy, quantize_gradient(dy, "ptq", b, rng,
                                                                zero_exact=zero))[0].sum()
                       for zero in (False, True)}
                rows.append({"bits": b, "layer": layer, "affine": var[False], "paper": var[True],
                             "zeros": float(np.mean(dy == 0))})
    t = pd.DataFrame(rows).groupby(["bits", "layer"], sort=False).mean().reset_index()
    t["paper_over_affine"] = t.paper / t.affine
    return t


def paper_table(t: pd.DataFrame) -> str:
    layers = list(dict.fromkeys(t.layer))
    rows = [[b, *(f"{t[(t.bits == b) & (t.layer == layer)].paper_over_affine.iloc[0]:.3g}"
                  for layer in layers)] for b in sorted(t.bits.unique(), reverse=True)]
    return markdown(["bits", *(f"layer {layer}" for layer in layers)], rows)


def tracked() -> pd.DataFrame:
    """Per tracked run: its outcome and its ratio (the largest over the layers; the bottom
    layer's) at the first measurement, the median and the maximum over the run."""
    rows = []
    for d in sorted(RUNS.glob("track-*")):
        if not (d / "metrics.csv").exists():
            continue
        config = json.loads((d / "config.json").read_text())
        metrics = pd.read_csv(d / "metrics.csv")
        ratios = metrics.filter(like="variance_ratio.").dropna()
        largest, bottom = ratios.max(axis=1), ratios["variance_ratio.0"]
        summary = d / "summary.json"
        rows.append({"run": d.name, "quantizer": config["quantizer"], "bits": config["grad_bits"],
                     "accuracy": 100 * json.loads(summary.read_text())["accuracy"]
                     if summary.exists() else None,
                     "largest_first": largest.iloc[0], "largest_median": largest.median(),
                     "largest_max": largest.max(), "bottom_median": bottom.median(),
                     "top_median": ratios.iloc[:, -1].median(),
                     "measured_epochs": " ".join(str(int(e) + 1)
                                                 for e in metrics.epoch[ratios.index])})
    return pd.DataFrame(rows)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    table = summary(results())
    table.to_csv(OUT / "accuracy.csv", index=False)
    plot(table)
    parts = ["# Generated by `bash reports/paper-shape-deep.sh` (reports/paper-shape-deep.py)", "",
             "## Final test accuracy %, mean ± std over seeds 0, 1, 2", "", accuracy_tables(table)]
    for model in ("cnn8", "cnn"):
        variance = variance_table(model)
        if variance:
            parts += [f"## {model} on MNIST-1D at batch 128 after 10 QAT epochs: quantization / "
                      f"sampling variance of each layer's weight gradient (`fqtsim variance`, "
                      f"exact column)", "", variance, ""]
    if (RUNS / "variance-cnn8-b128" / "training" / "model.pt").exists():
        paper = paper_against_affine()
        paper.to_csv(OUT / "ptq-range-variance.csv", index=False)
        parts += ["## cnn8 (the QAT model of its `fqtsim variance` above), PTQ on the same "
                  "activation gradients: the paper's range over fqtsim's affine one, "
                  "E||Q(dY) - dY||^2 (mean of 4 batches)",
                  "", paper_table(paper), ""]
    track = tracked()
    if len(track):
        track.to_csv(OUT / "predictor.csv", index=False)
        parts += ["## cnn8, seed 0, --track-variance 20: the ratio over the run against the "
                  "outcome",
                  "", markdown(["Q", "bits", "test accuracy %", "largest, epoch 1",
                                "largest, median", "largest, max", "layer 0, median",
                                "top layer, median", "epochs"],
                               [[r.quantizer.upper(), r.bits,
                                 "diverged" if pd.isna(r.accuracy) else f"{r.accuracy:.1f}",
                                 f"{r.largest_first:.3g}", f"{r.largest_median:.3g}",
                                 f"{r.largest_max:.3g}", f"{r.bottom_median:.3g}",
                                 f"{r.top_median:.3g}", r.measured_epochs]
                                for r in track.itertuples()]), ""]
    (OUT / "accuracy.md").write_text("\n".join(parts))
    print(f"wrote {OUT}/accuracy.md, accuracy.csv, accuracy.png")


if __name__ == "__main__":
    main()
