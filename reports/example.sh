#!/usr/bin/env bash
# Regenerates reports/example: the default `fqtsim run` with each gradient quantizer, its fp32 and
# QAT baselines, and the cost model's ResNet-50 (batch 64) on npu.yaml and npu-acc24.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
fqtsim=${FQTSIM:-.venv/bin/fqtsim}
# --restart: a run directory left from an earlier config is replaced, not refused
for q in ptq psq bhq; do
  "$fqtsim" run --quantizer "$q" --out "runs/example/fqt-$q" --restart > /dev/null
done
for mode in fp32 qat; do
  "$fqtsim" run --mode "$mode" --out "runs/example/$mode" --restart > /dev/null
done
"$fqtsim" report runs/example/fp32 runs/example/qat runs/example/fqt-ptq runs/example/fqt-psq \
  runs/example/fqt-bhq --model resnet50 --batch 64 --hw hw_configs/npu.yaml \
  --hw hw_configs/npu-acc24.yaml --out reports/example
