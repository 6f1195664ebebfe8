#!/bin/bash
# Every GPU measurement of issue 15 in one short run (≈ 9 min on one H100/H200), each step capped so that a slow one
# cannot take the others' time; results (JSON) go to ${OUT:-gpu-results}/.
#   bash benchmarks/gpu_all.sh                       # with the project's .venv active or PYTHON=... set
#   SUITE_S=600 BUDGET_S=560 bash benchmarks/gpu_all.sh   # more time: the compile variant gets its turn
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi -L
"$PY" -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__, torch.cuda.get_device_name())"
date +%T
timeout "${SUITE_S:-380}" "$PY" benchmarks/gpu_suite.py --images 32 --variants batch16 two-workers compile \
    --budget-s "${BUDGET_S:-340}" --models-dir "${MODELS_DIR:-/tmp/cnc-bench-models}" --out "$OUT/gpu_suite.json"
echo "suite rc=$?"; date +%T
timeout "${TRAIN_S:-160}" "$PY" benchmarks/train_throughput.py --size real --steps 3 --batch 4 --json "$OUT/train.json"
echo "train rc=$?"; date +%T
timeout "${LOADER_S:-40}" "$PY" benchmarks/loader_transfer.py --workers 4 --batches 16 --json "$OUT/loader.json"
echo "loader rc=$?"; date +%T
