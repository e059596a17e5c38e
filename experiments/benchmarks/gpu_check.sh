#!/usr/bin/env bash
# The one-shot GPU check of configs/gpu128.yaml (128^3 at 1.5 mm). Run ONCE on a CUDA machine from
# the repository root, with a CUDA build of torch and fedsynth importable:
#
#     PYTHON=/path/to/venv/bin/python bash experiments/benchmarks/gpu_check.sh [OUT_DIR]
#
# It writes OUT_DIR/gpu_check.md (default ./runs/gpu_check/gpu_check.md) with every figure:
#   1. experiments/benchmarks/gpu_scale.py: 128^3 pretraining step times and peak memory, DP vs
#      non-DP step (whole UNet, attention+conditioning), sampling+decoding volumes per second;
#   2. pretraining for a few hundred steps at 128^3 on a generated cohort (AE_EPOCHS, UNET_EPOCHS);
#   3. one simulated federated DP round at two sites (Flower simulation, sites sharing the GPU);
#   4. a small release (RELEASE_NUM candidates gated at both sites);
# with each stage's wall time and the GPU memory peak nvidia-smi saw during it.
# Sized to fit a few minutes of GPU time; shrink AE_EPOCHS / UNET_EPOCHS if time is shorter.
# Stages run in order; a failing stage is recorded and the next one still runs.

set -u
PYTHON="${PYTHON:-python}"
OUT="${1:-runs/gpu_check}"
AE_EPOCHS="${AE_EPOCHS:-50}"        # 24 public scans / batch 4 = 6 steps per epoch: 300 steps
UNET_EPOCHS="${UNET_EPOCHS:-50}"    # 6 steps per epoch: 300 steps
PATIENTS="${PATIENTS:-12}"          # per site
PUBLIC="${PUBLIC:-24}"
RELEASE_NUM="${RELEASE_NUM:-2}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPORT="$OUT/gpu_check.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLWR_TELEMETRY_ENABLED=0
FEDSYNTH=("$PYTHON" -m experiments.cli)

{
  echo "# fedsynth GPU check (configs/gpu128.yaml)"
  echo
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)."
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'bf16', torch.cuda.is_bf16_supported())" 2>&1
  echo '```'
} > "$REPORT"

MONITOR_PID=""
start_monitor() {  # GPU memory used (MiB), sampled every 200 ms, into $1
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" 2>/dev/null &
  MONITOR_PID=$!
}
stop_monitor() {
  if [ -n "$MONITOR_PID" ]; then kill "$MONITOR_PID" 2>/dev/null; wait "$MONITOR_PID" 2>/dev/null; fi
  MONITOR_PID=""
}
trap stop_monitor EXIT

stage() {  # stage NAME COMMAND...: run, time, record the exit code and the GPU memory peak
  local name="$1"; shift
  local log="$OUT/$name.log" mem="$OUT/$name.gpu_mem"
  echo "== $name: $*" >&2
  start_monitor "$mem"
  local started=$(date +%s.%N)
  "$@" > "$log" 2>&1
  local code=$?
  local ended=$(date +%s.%N)
  stop_monitor
  local peak=$(sort -n "$mem" 2>/dev/null | tail -1)
  {
    echo
    echo "## $name"
    echo
    echo "| measure | value |"
    echo "|---|---|"
    echo "| command | \`$*\` |"
    echo "| exit code | $code |"
    echo "| wall seconds | $(awk "BEGIN {printf \"%.1f\", $ended - $started}") |"
    echo "| peak GPU memory used (nvidia-smi, MiB, all processes) | ${peak:-n/a} |"
    echo
    echo '```'
    tail -n 25 "$log"
    echo '```'
  } >> "$REPORT"
  return $code
}

# 1. The benchmark (its own report, appended below).
stage gpu_scale "${FEDSYNTH[@]}" benchmark --only gpu_scale --device cuda \
  --out "$OUT/BENCHMARKS_gpu_scale.md"
[ -f "$OUT/BENCHMARKS_gpu_scale.md" ] && { echo; cat "$OUT/BENCHMARKS_gpu_scale.md"; } >> "$REPORT"

# 2-4. A 128^3 cohort (1.5 mm), its config, pretraining, one DP round, a small release.
stage cohort "${FEDSYNTH[@]}" cohort --out "$OUT/cohort" --size 128 --sites 2 \
  --patients "$PATIENTS" --public-patients "$PUBLIC"
"$PYTHON" - "$OUT" "$AE_EPOCHS" "$UNET_EPOCHS" <<'EOF'
import sys
from pathlib import Path

import yaml

out, ae_epochs, unet_epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = yaml.safe_load(Path("configs/gpu128.yaml").read_text())
config.update(run_dir=str(out / "run"), device="cuda")
config["data"]["public_dir"] = str(out / "cohort" / "public")
config["pretrain"]["autoencoder"]["epochs"] = ae_epochs
config["pretrain"]["unet"]["epochs"] = unet_epochs
config["federation"].update(rounds=1, min_sites=2, sites=[
    {"site_id": f"site_{k}", "data_dir": str(out / "cohort" / f"site_{k}"),
     "budget": {"target_epsilon": 10.0, "delta": 1.0e-3}} for k in range(2)])
(out / "gpu128_check.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
EOF
CONFIG="$OUT/gpu128_check.yaml"
stage pretrain "${FEDSYNTH[@]}" pretrain --config "$CONFIG" --no-tracking --device cuda
stage federate "${FEDSYNTH[@]}" federate --config "$CONFIG" --no-tracking --device cuda
stage release "${FEDSYNTH[@]}" release --config "$CONFIG" --num "$RELEASE_NUM" \
  --out "$OUT/release" --device cuda

echo "wrote $REPORT" >&2
