#!/usr/bin/env bash
# Regenerates reports/weights: final test accuracy (mean and std over seeds 0, 1, 2) and the
# update's share of step energy and DDR bytes per stored format of the weights and momentum, on
# the MLP/digits (20 epochs) and the CNN/MNIST-1D (10 epochs, to fit the grid in ~25 minutes on
# 2 cores), FQT with PSQ at 8 and 4 gradient bits on npu.yaml; then the analytic ResNet-50 and
# transformer-block steps per format (fqtsim.cost.update_costs). Formats: each weight format
# with fp32 momentum, fp32 weights with bf16 and int8 momentum, and bf16 and int8 throughout
# (fqtsim.analysis.report.COMPARED_FORMATS). The runs go to runs/weights/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
python=${PYTHON:-.venv/bin/python}
for combo in "mlp digits 20" "cnn mnist1d 10"; do
  set -- $combo
  sweep() {   # sweep NAME FORMAT-OPTIONS...: failed points are listed in results.csv
    local name=$1; shift
    "$fqtsim" sweep --model "$model" --dataset "$dataset" --epochs "$epochs" --quantizer psq \
      --grad-bits 8 4 --seed 0 1 2 "$@" --out "runs/weights/$model-$dataset-$name" || true
  }
  model=$1 dataset=$2 epochs=$3
  sweep weights --weights fp32 bf16-sr bf16-rn bf16-kahan int16-sr int8-sr int8-rn
  sweep momentum --momentum bf16 int8
  sweep bf16 --weights bf16-sr --momentum bf16
  sweep int8 --weights int8-sr --momentum int8
done
"$python" reports/weights.py
