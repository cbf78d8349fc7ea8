#!/usr/bin/env bash
# Regenerates reports/moonshot: the ways out of the wide write at 4-bit gradients, against
# dynamic BHQ. Test accuracy (mean and std over seeds 0-2) of the CNN on MNIST-1D and the MLP on
# digits for the range-based schemes (the runs of reports/predicted.sh, which this script runs
# first: it skips what is done) and for mxint and hadamard (runs/moonshot/, not committed); the
# clips per step; and one training step's extra energy and DDR bytes over delayed PTQ in closed
# form on npu.yaml, for those two models at batch 32 and for ResNet-50 at batch 64.
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
python=${PYTHON:-.venv/bin/python}
bash reports/predicted.sh > /dev/null
mkdir -p reports/moonshot runs/moonshot
for combo in "cnn mnist1d" "mlp digits"; do
  set -- $combo
  "$fqtsim" sweep --model "$1" --dataset "$2" --quantizer mxint hadamard --grad-bits 4 \
    --range dynamic delayed --seed 0 1 2 --out "runs/moonshot/$1-$2" || true
done
# the hard setting, where the quantizers part (reports/paper-shape-deep): the eight-layer CNN
deep=(--model cnn8 --dataset mnist1d --batch-size 128 --epochs 40 --schedule cosine
      --grad-bits 3 2 --seed 0 1 2)
"$fqtsim" sweep "${deep[@]}" --quantizer bhq psq mxint hadamard --range dynamic delayed \
  --out runs/moonshot/cnn8-mnist1d || true
"$fqtsim" sweep "${deep[@]}" --quantizer psq --range predicted \
  --out runs/moonshot/cnn8-mnist1d-predicted || true
"$python" - <<'PY'
import json
from pathlib import Path

import pandas as pd

import fqtsim.cost
from fqtsim import load_hw
from fqtsim.files import markdown_table
from fqtsim.simulation import workloads

SCHEMES = [("bhq", "dynamic"), ("psq", "dynamic"), ("psq", "delayed"), ("psq", "predicted"),
           ("ptq", "predicted"), ("mxint", "delayed"), ("mxint", "dynamic"),
           ("hadamard", "delayed"), ("hadamard", "dynamic")]
# the hard setting: 3 and 2 bits on the eight-layer CNN, where PTQ fails and BHQ leads PSQ
DEEP = [("bhq", "dynamic"), ("psq", "dynamic"), ("bhq", "delayed"), ("psq", "delayed"),
        ("psq", "predicted"), ("mxint", "delayed"), ("mxint", "dynamic"), ("hadamard", "delayed"),
        ("hadamard", "dynamic")]
BASE = ("ptq", "delayed")   # ranges known before every GEMM: what each scheme's extra is over
NOTES = [   # what the tables show, written from them
    "## What it shows", "",
    "- **At 4 bits on the small models the moonshot is met, but it proves little.** Every "
    "scheme is within 0.5 point of dynamic BHQ, even delayed PSQ with one range for the whole "
    "tensor. These tasks do not need BHQ at 4 bits, so they cannot show that a cheap scheme "
    "keeps its accuracy.",
    "- **The hard setting separates the schemes.** On cnn8 at 2 bits, every scheme with a range "
    "known before the data fails: delayed PSQ 45.4, delayed BHQ 55.1, predicted PSQ 64.3 (below "
    "BatchNorm the loss's norms predict the ranges poorly, and 67 values are clipped per step), "
    "delayed hadamard 62.3. Against them, dynamic BHQ holds 94.6 and dynamic PSQ 93.3.",
    "- **mxint meets the moonshot at 3 bits, not at 2.**",
    "  - At 3 bits: 97.3 with delayed activation ranges (+0.04 over dynamic BHQ), and 0.6% of "
    "BHQ's extra DDR traffic on ResNet-50 (scale bytes, 1 per 32 codes).",
    "  - At 2 bits: 90.6 with delayed activations (-4.0) and 93.1 with dynamic ones (-1.5). "
    "Dynamic activations cost 11% of BHQ's extra DDR, since every activation is then written "
    "wide.",
    "  - Accumulator overflows do not explain the gap between the two. Each block sum is "
    "aligned to its row's least exponent, so a spread of more than about 12 exponents along a "
    "row overflows the 32-bit accumulator, and the device counts it. The 3-bit runs with delayed "
    "activations count 232-3,269 overflows each and still reach 97.3. At 2 bits, the delayed seed "
    "with no overflow ends lowest (88.6). The delayed activation ranges clip 0.4 values per step; "
    "these runs do not settle what costs the 2.5 points.",
    "- **hadamard with dynamic ranges is the most accurate scheme at 2 bits: 95.2, +0.6 over "
    "dynamic BHQ.** It costs what dynamic PSQ costs, a third of BHQ's extra DDR traffic: the "
    "rotated rows still need their own ranges, so dY is written wide. With delayed ranges "
    "(one per tensor) it fails like delayed PSQ.",
    "- **Verdict: the moonshot is not met in the setting that needs it.** No scheme keeps 2-bit "
    "accuracy within 0.5 point of dynamic BHQ while adding at most 5% of its extra DDR traffic. "
    "At 3 bits mxint does. Two schemes come closest at 2 bits: mxint with dynamic activations "
    "(-1.5 points, 11%) and hadamard with dynamic ranges (+0.6 points, 33%).", ""]
hw = load_hw("hw_configs/npu.yaml")


def accuracies(sweeps: list, bits: int) -> pd.DataFrame:
    rows = []
    for runs in map(Path, sweeps):
        results = pd.read_csv(runs / "results.csv")
        for _, run in results[(results.status == "done") & (results.grad_bits == bits)].iterrows():
            steps = json.loads((runs / "points" / run.id / "summary.json").read_text())["steps"]
            rows.append({"quantizer": run.quantizer, "range": run.range_policy,
                         "accuracy": 100 * run.accuracy, "clips_per_step": run.clips / steps})
    return pd.DataFrame(rows).groupby(["quantizer", "range"]).agg(
        acc_mean=("accuracy", "mean"), acc_std=("accuracy", "std"), seeds=("accuracy", "count"),
        clips_per_step=("clips_per_step", "mean"))


def extras(shape, batch: int, schemes=SCHEMES) -> dict:
    """(extra energy in mJ, extra DDR in MB) of each scheme's step over the baseline's."""
    totals = {}
    for scheme in [BASE, *schemes]:
        step = fqtsim.cost.training_step(hw, shape, batch, *scheme, 4)
        totals[scheme] = (step.energy_pj.sum() / 1e9, step.loc[step.level == "ddr", "bytes"].sum() / 1e6)
    return {s: (pj - totals[BASE][0], ddr - totals[BASE][1]) for s, (pj, ddr) in totals.items()}


models = {"cnn": ("mnist1d", workloads.cnn((1, 1, 40), 10)), "mlp": ("digits", workloads.mlp(64, 10))}
acc = {model: accuracies([f"runs/predicted/{model}-{dataset}", f"runs/moonshot/{model}-{dataset}"], 4)
       for model, (dataset, _) in models.items()}
small = {model: extras(shape, 32) for model, (_, shape) in models.items()}
resnet = extras("resnet50", 64, list(dict.fromkeys(SCHEMES + DEEP)))
bhq_ddr = resnet[("bhq", "dynamic")][1]
rows = []
for scheme in SCHEMES:
    row = {"quantizer": scheme[0], "range": scheme[1]}
    within = True
    for model in models:
        a, ref = acc[model].loc[scheme], acc[model].loc[("bhq", "dynamic")]
        row[f"{model} acc %"] = f"{a.acc_mean:.1f} ± {a.acc_std:.1f}"
        row[f"{model} vs bhq"] = round(a.acc_mean - ref.acc_mean, 2)
        row[f"{model} clips/step"] = round(a.clips_per_step, 1)
        row[f"{model} extra uJ"] = round(1e3 * small[model][scheme][0], 2)
        row[f"{model} extra DDR KB"] = round(1e3 * small[model][scheme][1], 2)
        within &= a.acc_mean >= ref.acc_mean - 0.5
    row["resnet50 extra mJ"] = round(resnet[scheme][0], 1)
    row["resnet50 extra DDR MB"] = round(resnet[scheme][1], 1)
    row["of bhq's extra DDR %"] = round(100 * resnet[scheme][1] / bhq_ddr, 2)
    row["moonshot"] = "met" if within and resnet[scheme][1] <= 0.05 * bhq_ddr and scheme != ("bhq", "dynamic") else "-"
    rows.append(row)
table = pd.DataFrame(rows)
table.to_csv("reports/moonshot/moonshot.csv", index=False)
parts = ["# Ways out of the wide write, against dynamic BHQ", "",
         "Generated by `bash reports/moonshot.sh`. FQT on `hw_configs/npu.yaml`, 20 epochs, batch "
         "32, lr 0.05, seeds 0-2, 4-bit activation gradients. Accuracy: final test accuracy, "
         "mean ± sample std over the seeds, and its difference from dynamic BHQ's. clips/step: values "
         "clipped to a known range per step (forward activations and Q_bw under delayed and "
         "predicted ranges; grad_input under predicted). Extra energy and DDR bytes: one "
         "training step in closed form over the same step with delayed PTQ (every range known "
         "before its GEMM), for the small models at batch 32 and for ResNet-50 at batch 64. "
         "Moonshot: within 0.5 point of dynamic BHQ's accuracy on both tasks and at most 5% "
         "of its extra DDR traffic on ResNet-50.", "",
         markdown_table(table), ""]
deep = {bits: accuracies(["runs/moonshot/cnn8-mnist1d", "runs/moonshot/cnn8-mnist1d-predicted"], bits)
        for bits in (3, 2)}
steps = {}
for scheme in [BASE, *DEEP]:
    step = fqtsim.cost.training_step(hw, workloads.cnn8((1, 1, 40), 10), 128, *scheme, 2)
    steps[scheme] = (step.energy_pj.sum() / 1e9, step.loc[step.level == "ddr", "bytes"].sum() / 1e6)
rows = []
for scheme in DEEP:
    row = {"quantizer": scheme[0], "range": scheme[1]}
    within = True
    for bits, a_bits in deep.items():
        a, ref = a_bits.loc[scheme], a_bits.loc[("bhq", "dynamic")]
        row[f"{bits}-bit acc %"] = f"{a.acc_mean:.1f} ± {a.acc_std:.1f}"
        row[f"{bits}-bit vs bhq"] = round(a.acc_mean - ref.acc_mean, 2)
        within &= a.acc_mean >= ref.acc_mean - 0.5
    row["clips/step (2-bit)"] = round(deep[2].loc[scheme].clips_per_step, 1)
    row["cnn8 extra uJ"] = round(1e3 * (steps[scheme][0] - steps[BASE][0]), 1)
    row["cnn8 extra DDR KB"] = round(1e3 * (steps[scheme][1] - steps[BASE][1]), 1)
    row["resnet50 extra DDR MB"] = round(resnet[scheme][1], 1)
    row["of bhq's extra DDR %"] = round(100 * resnet[scheme][1] / bhq_ddr, 2)
    row["moonshot"] = "met" if within and resnet[scheme][1] <= 0.05 * bhq_ddr and scheme != ("bhq", "dynamic") else "-"
    rows.append(row)
hard = pd.DataFrame(rows)
hard.to_csv("reports/moonshot/moonshot-cnn8.csv", index=False)
parts += ["## The hard setting: the eight-layer CNN at 3 and 2 bits", "",
          "`--model cnn8 --dataset mnist1d --batch-size 128 --epochs 40 --schedule cosine`, seeds "
          "0-2, where dynamic PTQ fails at 2 bits and BHQ leads PSQ (reports/paper-shape-deep). "
          "Extra energy and DDR: one cnn8 step at batch 128, 2-bit gradients, over delayed PTQ; "
          "ResNet-50 as above. Moonshot here: within 0.5 point of dynamic BHQ at both widths.", "",
          markdown_table(hard), "", *NOTES]
Path("reports/moonshot/README.md").write_text("\n".join(parts))
print("\n".join(parts))
PY
