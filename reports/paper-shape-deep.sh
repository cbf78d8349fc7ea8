#!/usr/bin/env bash
# Regenerates reports/paper-shape-deep (issue 16, part 1): the paper's accuracy shape on models
# deep enough for quantization noise to accumulate, on npu.yaml, every run 40 epochs under a
# cosine learning rate from 0.05 down to 0.005 (--schedule cosine), seeds 0, 1, 2, one run at a
# time (--workers 1):
# 0. `fqtsim variance` on cnn8 (eight layers: seven 3x3 convs with BN and ReLU, then a Linear)
#    trained 10 epochs in QAT on MNIST-1D, at batch 128: the quantization / sampling variance
#    ratio per layer that chose the setting (and the same for the three-layer cnn);
# 1. cnn8 on MNIST-1D at batch 128: fp32, QAT, FQT with PTQ, PSQ and BHQ at 8, 4, 3, 2 gradient
#    bits;
# 2. the paper's PTQ (--ptq-range paper: the range stretched so that 0 is a code) at 4, 3 and 2
#    bits, on cnn8 and on mlp6;
# 3. the depth comparison: mlp6 and mlp on digits at batch 128, the three-layer cnn on MNIST-1D
#    at batch 128 (the full grid of 1.);
# 4. cnn8, seed 0, with --track-variance 20 (measured after epochs 1 and 21), PTQ at 2 and 4
#    bits, PSQ and BHQ at 2: does the ratio predict failure? (Tracking changes nothing else, but
#    `fqtsim run` computes on torch's default threads and a sweep's points on one thread each,
#    so these runs are not bit for bit their grid points of seed 0.)
# The runs go to runs/paper-shape-deep/ (not committed); tables, CSVs and the plot to
# reports/paper-shape-deep/ (reports/paper-shape-deep.py). About 70 minutes on 2 busy cores.
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
python=${PYTHON:-.venv/bin/python}
runs=runs/paper-shape-deep
mkdir -p "$runs" reports/paper-shape-deep
common=(--hw hw_configs/npu.yaml --epochs 40 --schedule cosine --seed 0 1 2 --workers 1)
grid=(--mode fp32 qat fqt --quantizer ptq psq bhq --grad-bits 8 4 3 2)

for model in cnn8 cnn; do
  [ -f "$runs/variance-$model-b128/variance.csv" ] || "$fqtsim" variance --model $model \
    --dataset mnist1d --batch-size 128 --batches 16 --draws 16 --bits 2 3 4 8 --epochs 10 \
    --out "$runs/variance-$model-b128"
done
# failed points (a diverged run) are listed in results.csv; the next sweep goes on
"$fqtsim" sweep --model cnn8 --dataset mnist1d --batch-size 128 "${grid[@]}" "${common[@]}" \
  --out "$runs/cnn8-mnist1d" || true
"$fqtsim" sweep --model cnn8 --dataset mnist1d --batch-size 128 --mode fqt --quantizer ptq \
  --ptq-range paper --grad-bits 4 3 2 "${common[@]}" --out "$runs/cnn8-mnist1d-paper" || true
for model in mlp6 mlp; do
  "$fqtsim" sweep --model $model --dataset digits --batch-size 128 "${grid[@]}" "${common[@]}" \
    --out "$runs/$model-digits" || true
done
"$fqtsim" sweep --model cnn --dataset mnist1d --batch-size 128 "${grid[@]}" "${common[@]}" \
  --out "$runs/cnn-mnist1d" || true
"$fqtsim" sweep --model mlp6 --dataset digits --batch-size 128 --mode fqt --quantizer ptq \
  --ptq-range paper --grad-bits 4 3 2 "${common[@]}" --out "$runs/mlp6-digits-paper" || true
for point in "ptq 2" "ptq 4" "psq 2" "bhq 2"; do
  set -- $point
  out="$runs/track-cnn8-$1$2"
  [ -f "$out/summary.json" ] || "$fqtsim" run --model cnn8 --dataset mnist1d --batch-size 128 \
    --epochs 40 --schedule cosine --quantizer "$1" --grad-bits "$2" --track-variance 20 \
    --out "$out" || true   # a diverged run keeps its metrics
done
"$python" reports/paper-shape-deep.py
