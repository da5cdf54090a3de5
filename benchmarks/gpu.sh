#!/usr/bin/env bash
# The GPU path, run once for real on a lent GPU machine (issue 17), in under 8 minutes: install,
# the generated 15-Scene-shaped folder, this machine's floor, the study's parts that fit, a 3-trial
# sweep whose trials must log gpu/* and system/gpu_* metrics, and the CUDA tests. Everything it
# prints and writes lands in $OUT (the device tool brings it back), or ./gpu-out elsewhere.
#
#   bash benchmarks/gpu.sh            # from the repository root, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true SCENESWEEP_OFFLINE=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu.log"; }
step() { log "$1"; shift; timeout "$@" 2>&1 | tee -a "$OUT/gpu.log"; echo "   exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu.log"; }

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
step "install (make install, the gpu extra)" 600 bash -c "make -s install && .venv/bin/pip install -q -e '.[gpu]'"
PY=.venv/bin/python
step "data: 1500 generated scenes" 120 $PY benchmarks/make_scenes.py /tmp/scenes-gpu --scale 0.34 --exist-ok
step "floor: conv ceilings fp32/bf16 and the head step on cuda" 120 $PY benchmarks/floor.py --device cuda
step "precision auto on cuda (measured) and extraction against its ceiling" 180 \
  $PY benchmarks/extract.py --device cuda --extractor-images 1000 --poolings-only
step "study parts: Q8 and Q12.2 on cuda" 300 \
  $PY benchmarks/study.py --data /tmp/scenes-gpu --device cuda --experiments q8,q12_2 --out "$OUT/study" \
  -- --n_trials 6 --epochs 10
step "a 3-trial pooling sweep on cuda: gpu/* and system/gpu_* per trial" 240 bash -c "
  export MLFLOW_TRACKING_URI=sqlite:////tmp/gpu-store/mlflow.db; mkdir -p /tmp/gpu-store
  .venv/bin/scenesweep sweep sweeps/pooling.yaml --data /tmp/scenes-gpu --image_size 224 --n_trials 3 --epochs 3 \
    --device cuda --cache_dir /tmp/gpu-cache --no-progress --study_name gpu-check &&
  $PY - <<'PYEOF'
from mlflow.tracking import MlflowClient
client = MlflowClient()
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
trials = [r for r in runs if 'trial_number' in r.data.tags]
for r in trials:
    gpu = sorted(k for k in r.data.metrics if k.startswith('gpu/'))
    system = sorted(k for k in r.data.metrics if k.startswith('system/gpu'))
    print(r.info.run_name, r.info.status, r.data.params.get('resolved.precision'), r.data.tags.get('hardware.gpu'), gpu, system[:3])
    assert gpu, 'a trial logged no gpu/* metric'
PYEOF"
step "pytest -k cuda" 240 $PY -m pytest -q -k cuda -p no:cacheprovider tests
log "done"
