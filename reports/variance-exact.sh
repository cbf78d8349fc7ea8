#!/usr/bin/env bash
# Regenerates reports/variance-exact (issue 16, parts 2 and 3), on npu.yaml:
# 1. `fqtsim variance` on models trained 20 epochs in QAT (the defaults of `fqtsim run`): per
#    layer the sampling, measured and exact variance of the weight gradient, the paper's bound,
#    the statistical estimate and the factors of bound / exact, for PTQ, PSQ and BHQ at 4 and 8
#    bits: the digits MLP at batch 32, 64, 128 and 256, the six-layer MLP (mlp6) at 128 (16
#    passes a point: its exact column is closed form, 128 columns carried through 5 layers), the
#    CNN on MNIST-1D at 32;
# 2. the divergence predictor: FQT runs with `--track-variance 2` (each layer's quantization /
#    sampling variance every other epoch) for the MLP at batch 32 with 2 and 3 gradient bits and
#    mlp6 at batch 128 with 2 to 4, against their final accuracy.
# The runs go to runs/variance-exact/ (not committed); tables, CSVs and plots to
# reports/variance-exact/. About 6 minutes on 2 idle cores, 11 on busy ones.
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
python=${PYTHON:-.venv/bin/python}
runs=runs/variance-exact
out=reports/variance-exact
mkdir -p "$runs" "$out"

"$fqtsim" run --mode qat --model mlp --dataset digits --out "$runs/qat-mlp"
"$fqtsim" run --mode qat --model mlp6 --dataset digits --batch-size 128 --out "$runs/qat-mlp6"
"$fqtsim" run --mode qat --model cnn --dataset mnist1d --out "$runs/qat-cnn"
# name, run, batch size, batches (the digits training set holds 1,438 samples), passes
for point in "mlp-b32 qat-mlp 32 16 64" "mlp-b64 qat-mlp 64 16 64" \
             "mlp-b128 qat-mlp 128 11 64" "mlp-b256 qat-mlp 256 5 32" \
             "mlp6-b128 qat-mlp6 128 11 16" "cnn-b32 qat-cnn 32 16 64"; do
  set -- $point
  "$fqtsim" variance --run "$runs/$2" --batch-size "$3" --batches "$4" --draws "$5" --bits 4 8 \
    --out "$runs/variance-$1"
  cp "$runs/variance-$1/variance.csv" "$out/variance-$1.csv"
  cp "$runs/variance-$1/variance.png" "$out/variance-$1.png"
done

# model, batch size, quantizer, gradient bits
for point in "mlp 32 ptq 2" "mlp 32 ptq 3" "mlp 32 psq 2" "mlp 32 psq 3" "mlp 32 bhq 2" \
             "mlp 32 bhq 3" "mlp6 128 ptq 2" "mlp6 128 ptq 3" "mlp6 128 ptq 4" "mlp6 128 psq 2" \
             "mlp6 128 bhq 2"; do
  set -- $point
  "$fqtsim" run --model "$1" --batch-size "$2" --quantizer "$3" --grad-bits "$4" \
    --track-variance 2 --out "$runs/track-$1-$3$4" || true   # a diverged run keeps its metrics
done

"$python" - "$runs" "$out" <<'PY'
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

runs, out = Path(sys.argv[1]), Path(sys.argv[2])


def g(v) -> str:
    return "" if pd.isna(v) else f"{v:.3g}"


def markdown(header: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def variance_table(name: str) -> str:
    t = pd.read_csv(out / f"variance-{name}.csv", dtype={"layer": str})
    return markdown(["layer", "Q", "bits", "sampling", "measured", "exact", "bound", "statistical",
                     "bound / exact", "SR", "X", "norms"],
                    [[r.layer, r.quantizer.upper(), r.bits, g(r.sampling),
                      f"{g(r.empirical)} ± {g(r.empirical_se)}",
                      f"{g(r.exact)} ± {g(r.exact_se)}",
                      g(r.bound), g(r.statistical), g(r.bound_over_exact), f"{r.sr_factor:.2f}",
                      g(r.x_factor), g(r.norm_factor)] for r in t.itertuples()])


def tracked() -> pd.DataFrame:
    """Per tracked run: its outcome and its ratio (the largest over the layers) at the first
    measurement, its median and maximum over the run, and the first epoch it passed 1."""
    rows = []
    for d in sorted(runs.glob("track-*")):
        config = json.loads((d / "config.json").read_text())
        metrics = pd.read_csv(d / "metrics.csv")
        ratio = metrics.filter(like="variance_ratio.").dropna().max(axis=1)
        summary = d / "summary.json"
        above = ratio[ratio > 1]
        rows.append({"run": d.name, "model": config["model"], "batch": config["batch_size"],
                     "quantizer": config["quantizer"], "bits": config["grad_bits"],
                     "accuracy": 100 * json.loads(summary.read_text())["accuracy"]
                     if summary.exists() else None,
                     "first": ratio.iloc[0], "median": ratio.median(), "max": ratio.max(),
                     "above_1_from": int(metrics.epoch[above.index[0]]) + 1 if len(above) else None,
                     "epochs": [int(e) + 1 for e in metrics.epoch[ratio.index]],
                     "ratios": ratio.tolist()})
    return pd.DataFrame(rows)


table = tracked()
table.drop(columns=["epochs", "ratios"]).to_csv(out / "predictor.csv", index=False)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (model, part) in zip(axes, table.groupby("model", sort=False)):
    for r in part.itertuples():   # a colour per quantizer, a marker per width
        state = "diverged" if pd.isna(r.accuracy) else f"{r.accuracy:.1f}%"
        ax.plot(r.epochs, r.ratios, color=f"C{['ptq', 'psq', 'bhq'].index(r.quantizer)}",
                marker="^os"[r.bits - 2], markerfacecolor="none",
                label=f"{r.quantizer.upper()} {r.bits}-bit: {state}")
    ax.axhline(1.0, color="grey", lw=2, alpha=0.6)
    ax.set(yscale="log", xlabel="epoch", title=f"{model}, batch {part.batch.iloc[0]}")
    ax.legend(fontsize=8)
axes[0].set_ylabel("largest over the layers:\nquantization / sampling variance")
fig.tight_layout()
fig.savefig(out / "predictor.png", dpi=110)

parts = ["# Generated by `bash reports/variance-exact.sh`: the tables README.md quotes", ""]
for name, title in (("mlp-b32", "MLP on digits, batch 32"),
                    ("mlp-b64", "MLP on digits, batch 64"),
                    ("mlp-b128", "MLP on digits, batch 128"),
                    ("mlp-b256", "MLP on digits, batch 256"),
                    ("mlp6-b128", "six-layer MLP on digits, batch 128"),
                    ("cnn-b32", "CNN on MNIST-1D, batch 32")):
    parts += [f"## {title}", "", variance_table(name), ""]
parts += ["## Tracked ratio (largest over the layers) against the run's outcome", "",
          markdown(["model", "batch", "Q", "bits", "test accuracy %", "epoch 1", "median", "max",
                    "above 1 from epoch"],
                   [[r.model, r.batch, r.quantizer.upper(), r.bits,
                     "diverged" if pd.isna(r.accuracy) else f"{r.accuracy:.1f}", g(r.first),
                     g(r.median), g(r.max), "" if pd.isna(r.above_1_from) else int(r.above_1_from)]
                    for r in table.itertuples()]), ""]
(out / "tables.md").write_text("\n".join(parts))
PY
