#!/usr/bin/env bash
# Regenerates reports/gpt: validation loss (nats per character; mean and std over seeds 0, 1,
# 2) of the transformer language model (fqtsim run --model gpt: 2 blocks, width 64, 4 heads,
# context 64) on stdlib-docs, 8 epochs of 1,024 windows at batch 16 (512 steps), peak lr 0.5,
# in fp32, QAT and FQT with PTQ, PSQ and BHQ at 8, 6, 5 and 4 gradient bits, on npu.yaml. The
# runs go to runs/gpt/ (not committed); the table, the plot and every run's row to reports/gpt/.
# About 40 minutes on 2 busy cores (42 runs, 2 at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
python=${PYTHON:-.venv/bin/python}
"$fqtsim" sweep --model gpt --dataset stdlib-docs --mode fp32 qat fqt --quantizer ptq psq bhq \
  --grad-bits 8 6 5 4 --seed 0 1 2 --epochs 8 --batch-size 16 --lr 0.5 --hw hw_configs/npu.yaml \
  --workers 2 --out runs/gpt || true    # failed points are listed in results.csv
"$python" reports/gpt.py
