#!/usr/bin/env bash
# GPU checks of the LAPS head, one command, under 8 minutes on one H100:
#   1. head parity tests on CUDA (golden fixtures and randomized cases vs the reference loop),
#   2. laps-bench at ViT-B/16 224, Swin-B 224 and ViT-B/16 384, batch 128: head training step,
#      F30K-shaped scoring (1,000 x 5,000 pairs), memory, and a full bf16 training step,
#   3. laps-estimate against torch.cuda.max_memory_allocated of the same step (ViT-B/16 224,
#      batch 64, fp32 and bf16-mixed, 20-token captions): estimate.json with measured_peak_gib.
# Results (JSON, logs, junit XML) go to $OUT when set, else ./gpu_results.
# Usage (repository root): bash scripts/gpu_checks.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
start=$(date +%s)
DEADLINE="${GPU_CHECKS_DEADLINE:-470}"  # seconds for the whole script
log() { echo "[gpu_checks +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/gpu_checks.log"; }
# timeout for the next step: its own cap, but never past the deadline
budget() { local left=$(( DEADLINE - ($(date +%s) - start) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }

# --- install only what is missing -------------------------------------------------------------
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { log "no CUDA device visible to torch; nothing to check"; exit 1; }
missing=()
for mod in transformers rich pytest; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing missing: ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi
"$PY" -c "import laps" 2>/dev/null || { log "installing laps (editable, no deps)"; "$PY" -m pip install -q --no-deps -e .; }
"$PY" - <<'EOF' | tee -a "$OUT_DIR/gpu_checks.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
EOF

status=0
# --- 1. parity on CUDA ------------------------------------------------------------------------
log "head parity tests on cuda"
timeout "$(budget 90)" "$PY" -m pytest -q -p no:cacheprovider tests/test_head.py -k "cuda" \
  --junitxml="$OUT_DIR/test_head_cuda.xml" 2>&1 | tee "$OUT_DIR/test_head_cuda.log" || status=1

# --- 2. benchmarks ----------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # random-weight backbones from built-in configs
for backbone in vit swin vit_384; do
  log "laps-bench --train-step $backbone --batch 128"
  timeout "$(budget 110)" "$PY" -m laps.cli.bench --device cuda --train-step "$backbone" --batch 128 \
    --score-images 1000 --score-captions 5000 --reference-captions 250 --repeats 2 --train-steps 3 \
    --out "$OUT_DIR/bench_${backbone}.json" 2>&1 | tee "$OUT_DIR/bench_${backbone}.log" || status=1
done

# --- 3. the memory estimate against the measured peak -----------------------------------------
for precision in 32-true bf16-mixed; do
  log "laps-estimate estimate.measure=true, ViT-B/16 224 batch 64 $precision"
  timeout "$(budget 90)" "$PY" -m laps.cli.estimate experiment=f30k_vit dataset.batch_size=64 \
    trainer.precision="$precision" estimate.caption_length=20 estimate.measure=true \
    hydra.run.dir="$OUT_DIR/estimate_$precision" paths.output_dir="$OUT_DIR/estimate_$precision" \
    2>&1 | tee "$OUT_DIR/estimate_$precision.log" || status=1
done

log "done (status $status); results in $OUT_DIR"
exit "$status"
