#!/bin/bash
# gpu_check.sh — every GPU measurement of the project in one command on a bare GPU machine, <= 7 min in all.
#
#   make gpu-check                      # = bash benchmarks/gpu_check.sh; results in ${OUT:-gpu-results}/
#   make gpu-wheels                     # once, where pip can download: the wheels the GPU image lacks -> .whl/
#   CPU_SMOKE=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh    # tiny models on the CPU (what the tests run)
#
# The machine needs only Python with torch (the GPU image also has transformers, accelerate, opencv...); the
# project is used from this source tree (PYTHONPATH, nothing installed), the missing packages come from the carried
# wheels in .whl/ (benchmarks/gpu_wheels.txt), installed into a private folder ($SITE). Phases, each under
# `timeout`, capped by what is left of TOTAL_S (default 420 s) so the whole run leaves time for a rerun:
#   install  wheels of gpu_wheels.txt the machine lacks (or has older) -> $SITE      (pip --no-index --target; unzip)
#   env      versions, GPU, every import the phases need -> env.json; stops here (exit 3) when one fails
#   suite    benchmarks/gpu_suite.py: reference (fp32, batch 1) vs shipped + variants, counted FLOPs -> gpu_suite.json
#   train    benchmarks/train_throughput.py --size real: shipped, reference, latents, checkpointing on/off, AdamW
#            foreach -> train.json
#   micro    benchmarks/gpu_micro.py: UNet (batch, channels_last, compile, host syncs), inpainting host syncs, SAM
#            (attention, weights, decoder) -> micro.json
#   loader   benchmarks/loader_transfer.py, when >= 35 s are left -> loader.json
# After every phase summary.json + summary.md are rewritten (benchmarks/gpu_summary.py), so a run stopped at any
# point keeps what it measured; nvidia-smi is sampled every 500 ms -> smi.csv, phase marks -> phases.csv.
# Knobs: TOTAL_S, OUT, PYTHON, SITE, WHL, PHASES="suite train micro loader", VARIANTS (suite; in order of interest,
# the ones the budget does not cover are listed as skipped: a second call `PHASES=suite VARIANTS="..."` measures
# them), IMAGES (32), TRAIN_BATCH (4), MODELS_DIR (/dev/shm when >= 14 GB free, else /tmp), CPU_SMOKE=1.
set -u
T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
TOTAL_S=${TOTAL_S:-420}
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu-results}
SITE=${SITE:-/tmp/cnc-gpu-site}
WHL=${WHL:-$REPO/.whl}
WHEELS=${WHEELS:-$REPO/benchmarks/gpu_wheels.txt}
SMOKE=${CPU_SMOKE:-0}
IMAGES=${IMAGES:-32}
PHASES=" ${PHASES:-suite train micro loader} "
want() { [[ "$PHASES" == *" $1 "* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export CNC_CACHE=${CNC_CACHE:-/tmp/cnc-cache-gpu-check}
# the project from this source tree and the private package folder, no installation, no sys.path changes in code
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
# cap WANT RESERVE: WANT seconds, or what is left after keeping RESERVE seconds for later phases
cap() { local l=$(( $(left) - $2 )); if (( l < $1 )); then echo $(( l > 0 ? l : 0 )); else echo "$1"; fi; }
log() { echo "[$(date +%T) +$(elapsed)s] $*" | tee -a "$OUT/log.txt"; }
mark() { echo "$(date +%s.%N),$1,$2" >> "$OUT/phases.csv"; }
summary() { timeout -k 5 60 "$PY" "$REPO/benchmarks/gpu_summary.py" "$OUT" > "$OUT/summary.log" 2>&1 \
  || log "summary failed (summary.log)"; }
run_phase() {  # run_phase NAME CAP_S CMD... : output -> NAME.log, rc -> phases.csv, then the summary
  local name=$1 secs=$2; shift 2
  if (( secs < 10 )); then log "$name skipped: ${secs}s left for it"; mark "$name" skipped; return 0; fi
  log "$name: cap ${secs}s: $*"
  mark "$name" start
  timeout -k 5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  mark "$name" "end rc=$rc"
  log "$name rc=$rc ($( [ $rc -eq 124 ] && echo 'stopped by its cap; what it wrote is kept' || echo done)); tail:"
  tail -n 15 "$OUT/$name.log" | tee -a "$OUT/log.txt"
  summary
  return 0
}

log "gpu_check: TOTAL_S=$TOTAL_S smoke=$SMOKE python=$PY out=$OUT site=$SITE"
SMI_PID=
if [ "$SMOKE" != 1 ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm \
    --format=csv,noheader,nounits -lms 500 > "$OUT/smi.csv" 2> /dev/null &
  SMI_PID=$!
fi
trap '[ -n "$SMI_PID" ] && kill "$SMI_PID" 2> /dev/null' EXIT

# -- install: the carried wheels the machine lacks (or has older) ---------------------------------------------------
mark install start
NEED=$(timeout -k 5 60 "$PY" - "$WHEELS" "$WHL" <<'EOF'
import glob, os, sys
from importlib import metadata

def older(have, want):
    try:
        from packaging.version import Version
        return Version(have) < Version(want)
    except Exception:  # noqa: BLE001 - no packaging: compare the numeric parts
        num = lambda v: tuple(int(x) for x in v.split(".")[:3] if x.isdigit())
        return num(have) < num(want)

need, lacking = [], []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    spec = line.split()[0]
    dist, _, version = spec.partition("==")
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or older(have, version):
        wheel = glob.glob(os.path.join(sys.argv[2], f"{dist.replace('-', '_')}-{version}-*.whl"))
        (need if wheel else lacking).append(spec if wheel else f"{spec} (have {have}, no wheel in {sys.argv[2]})")
print(" ".join(need))
for item in lacking:
    print("LACKING " + item, file=sys.stderr)
EOF
)
if [ -n "$NEED" ]; then
  log "installing into $SITE: $NEED"
  mkdir -p "$SITE"
  if ! timeout -k 5 120 "$PY" -m pip install -q --no-index --no-deps --upgrade --find-links "$WHL" --target "$SITE" \
      $NEED >> "$OUT/install.log" 2>&1; then
    log "pip failed (install.log): unzipping the wheels into $SITE instead"
    for spec in $NEED; do
      dist=${spec%%==*}; version=${spec##*==}
      for w in "$WHL"/"${dist//-/_}"-"$version"-*.whl; do
        [ -f "$w" ] && "$PY" -m zipfile -e "$w" "$SITE" && echo "unzipped $w" >> "$OUT/install.log"
      done
    done
  fi
else
  log "nothing to install (every distribution of $(basename "$WHEELS") present, or no wheel for it)"
fi
mark install end

# -- env: versions, GPU, the imports every phase needs ---------------------------------------------------------------
mark env start
timeout -k 5 120 "$PY" - "$OUT/env.json" "$WHEELS" <<'EOF'
import importlib, json, os, platform, sys
res = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
       "pythonpath": os.environ.get("PYTHONPATH", ""), "modules": {}}
carried = [ln.split("#")[0].split()[1] for ln in open(sys.argv[2]) if len(ln.split("#")[0].split()) > 1]
required = ["torch", "torchvision", "transformers", "accelerate", "huggingface_hub", "cv2", "PIL", "numpy", "yaml",
            "fsspec", *carried, "triplets.builder", "triplets.flops", "pipelines.worker", "cnc_model.training.trainer",
            "cnc_model.data"]
bad = []
for name in dict.fromkeys(required):
    try:
        m = importlib.import_module(name)
        res["modules"][name] = {"ok": True, "version": getattr(m, "__version__", None),
                                "file": getattr(m, "__file__", None)}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        res["modules"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        bad.append(name)
try:
    import torch
    res["cuda"] = torch.cuda.is_available()
    if res["cuda"]:
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   cuda_version=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
except Exception as exc:  # noqa: BLE001
    res["torch_error"] = repr(exc)[:300]
res["required_failed"] = bad
open(sys.argv[1], "w").write(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k != "modules"}))
for name in bad:
    print(f"REQUIRED IMPORT FAILED: {name}: {res['modules'][name]['error']}")
sys.exit(3 if bad else 0)
EOF
ENV_RC=$?
mark env "end rc=$ENV_RC"
if [ $ENV_RC -ne 0 ]; then
  log "required imports failed (env.json): stopping before any GPU work"
  summary
  exit 3
fi

# -- the phases -------------------------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # tiny models on a possibly shared CPU: no threads spinning
  SUITE_ARGS=(--tiny --images 4 --resolution 64 --steps 1 --threads 1
              --variants ${VARIANTS:-batch8 stock-pndm+host-inline})
  TRAIN_ARGS=(--size tiny --steps 1 --warmup 0 --batch 2 --settings project reference)
  MICRO_ARGS=(--tiny)
  LOADER_ARGS=(--resolution 64 --samples 8 --batch 2 --batches 2 --workers 0)
  R_SUITE=120; R_TRAIN=120; R_MICRO=60
else
  MODELS_DIR=${MODELS_DIR:-}
  if [ -z "$MODELS_DIR" ]; then  # ~9.4 GB of fp32 random weights: RAM-backed when there is room
    SHM_FREE=$(df -Pk /dev/shm 2> /dev/null | awk 'NR==2 {print int($4/1048576)}')
    if [ "${SHM_FREE:-0}" -ge 14 ]; then MODELS_DIR=/dev/shm/cnc-bench-models; else MODELS_DIR=/tmp/cnc-bench-models; fi
  fi
  SUITE_ARGS=(--images "$IMAGES" --models-dir "$MODELS_DIR"
              --variants ${VARIANTS:-batch16+channels-last+sam-folded+sam-fp16-weights stock-pndm+host-inline batch16 \
                                    channels-last sam-folded sam-fp16-weights batch8 two-workers})
  TRAIN_ARGS=(--size real --steps 3 --warmup 1 --batch "${TRAIN_BATCH:-4}"
              --settings project reference project-latents project-checkpointing project-no-checkpointing
                         project-foreach)
  MICRO_ARGS=(--models-dir "$MODELS_DIR")
  LOADER_ARGS=(--workers 4 --samples 104 --batches 12)
  R_SUITE=210; R_TRAIN=110; R_MICRO=75
fi
want train || R_TRAIN=0
want micro || R_MICRO=0
S=$(cap "$R_SUITE" $(( R_TRAIN + R_MICRO + 10 )))
want suite && run_phase suite "$S" "$PY" benchmarks/gpu_suite.py "${SUITE_ARGS[@]}" \
  --budget-s $(( S > 30 ? S - 15 : 10 )) --out "$OUT/gpu_suite.json"
T=$(cap "$R_TRAIN" $(( R_MICRO + 10 )))
want train && run_phase train "$T" "$PY" benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --json "$OUT/train.json"
M=$(cap "$R_MICRO" 5)
want micro && run_phase micro "$M" "$PY" benchmarks/gpu_micro.py "${MICRO_ARGS[@]}" \
  --budget-s $(( M > 15 ? M - 8 : 5 )) --out "$OUT/micro.json"
if want loader && { (( $(left) >= 35 )) || [ "$SMOKE" = 1 ]; }; then
  run_phase loader "$(cap 40 3)" "$PY" benchmarks/loader_transfer.py "${LOADER_ARGS[@]}" --json "$OUT/loader.json"
elif want loader; then
  log "loader skipped: $(left)s left"
fi
summary
log "done in $(elapsed)s (TOTAL_S=$TOTAL_S): $OUT/summary.md"
