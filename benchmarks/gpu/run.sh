#!/usr/bin/env bash
# One-shot GPU check (`make gpu-check`), for an H100/H200 machine whose image has torch+CUDA,
# nvcc, ninja and compute-sanitizer. Budget: 8 minutes on an H200. Steps, each timed and logged:
#   0. wheels  pyzmq and msgspec from benchmarks/gpu/wheels (fetch_wheels.sh) into a temporary
#              folder put on PYTHONPATH, where $PY cannot import them already
#   1. build   the extension in place, RLHF_ENGINE_CUDA=1 (sm_80 + sm_90a; flags in setup.py)
#   2. tests   tests/ops on the device (the `device` fixture runs cuda cases when a GPU is visible)
#   3. memcheck, racecheck   compute-sanitizer over a small subset of the op tests (cuda cases),
#              with torch's caching allocator off so that out-of-bounds accesses hit real bounds
#   4. bench   benchmarks/bench_kernels.py --n 16384 (V = 32000 and 151936) with the measured
#              copy bandwidth (HBM) floor beside each row, and the hidden-state rows
# Writes benchmarks/results/gpu_check_<device>_<date>.json (+ the bench JSON and logs), and copies
# them to $OUT when set. Exit status: non-zero if any step failed. Each step has a time limit
# (below) so that the whole script ends within 8 minutes; a step over its limit fails (rc 124).
#
# Usage: benchmarks/gpu/run.sh [--device cuda|cpu] [--python PY] [--skip-build]
#   --device cpu   dry run of every step on the CPU (no GPU here): build with RLHF_ENGINE_CUDA=0,
#                  tests on cpu, the sanitizer subset run without the sanitizer, bench --quick.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
PY=${PYTHON:-python3}
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
# Time limits per step (seconds) on the GPU machine: 120 + 90 + 75 + 75 + 120 = 480 s = 8 min,
# plus up to 60 s for the wheels (two small wheels: a few seconds).
# The CPU dry run gets 8 times as long (2 cores, no GPU).
SCALE=$([ "$DEVICE" = cuda ] && echo 1 || echo 8)
limit() { echo $(($1 * SCALE)); }

STAMP=$(date -u +%Y-%m-%dT%H%M%S)
RESULTS=benchmarks/results
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SUMMARY="$RESULTS/gpu_check_${DEVICE}_${STAMP}.json"
BENCH_JSON="$RESULTS/kernels_${DEVICE}_${STAMP}.json"
STEPS="$LOGS/steps.tsv"
: > "$STEPS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The sanitizer subset: small shapes, every kernel (fwd, bwd, in-place bwd, KL, GAE, hidden).
SAN_TESTS=(tests/ops/test_ops_logprobs.py tests/ops/test_ops_hidden_logprobs.py tests/ops/test_ops_token_kl.py
           tests/ops/test_ops_gae.py)
SAN_K="$DEVICE and (hand_computed or inplace or gradcheck or custom_ignore or tied or chunk_size or full_kl_of_identical or packed)"

# step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $LOGS/NAME.log, records rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local secs=$(echo "$(date +%s.%N) - $t0" | bc)
  tail -n 15 "$LOGS/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$*" >> "$STEPS"
  echo "== $name: rc=$rc in ${secs}s"
}

skip() {  # skip NAME WHY
  echo "== $1: skipped ($2)"
  printf '%s\t%s\t%s\t%s\n' "$1" "skipped" "0" "$2" >> "$STEPS"
}

if [ "$DEVICE" = cuda ]; then
  export RLHF_ENGINE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  NVCC=$(command -v nvcc || true)
  [ -n "$NVCC" ] && export CUDA_HOME=${CUDA_HOME:-$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
  (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$NVCC" --version | tail -1) \
    > "$LOGS/env.log" 2>&1
else
  export RLHF_ENGINE_CUDA=0 CUDA_VISIBLE_DEVICES=""
  echo "dry run on the CPU: no GPU figure comes out of this" > "$LOGS/env.log"
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" >> "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

# The packages the image lacks (pyzmq, msgspec), from the wheels benchmarks/gpu/fetch_wheels.sh
# fetched here (carry benchmarks/gpu/wheels), installed into a folder put first on PYTHONPATH.
WHEELS=benchmarks/gpu/wheels
if "$PY" -c "import zmq, msgspec" 2>/dev/null; then
  skip wheels "zmq and msgspec already importable by $PY"
elif ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  step wheels "$(limit 60)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$LOGS/site" "$WHEELS"/*.whl
  export PYTHONPATH="$LOGS/site:$PYTHONPATH"
else
  step wheels 5 sh -c "echo 'zmq/msgspec missing and no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh here and carry $WHEELS'; exit 1"
fi

if [ "$BUILD" = 1 ]; then
  step build "$(limit 120)" "$PY" setup.py -q build_ext --inplace
else
  skip build "--skip-build"
fi
step tests "$(limit 90)" "$PY" -m pytest tests/ops -q -p no:cacheprovider -m "not slow" -x -k "not $([ "$DEVICE" = cuda ] && echo cpu || echo cuda)"
if [ "$DEVICE" = cuda ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for tool in memcheck racecheck; do
    if [ -n "$SAN" ]; then
      step "$tool" "$(limit 75)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 9 \
        "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider -x -k "$SAN_K"
    else
      step "$tool" 5 sh -c "echo 'compute-sanitizer not found'; exit 127"
    fi
  done
else
  # The same selection without the sanitizer: checks that it selects tests and that they pass.
  step memcheck "$(limit 75)" "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider -x -k "$SAN_K"
  skip racecheck "compute-sanitizer needs a GPU; the selection ran in the memcheck step without it"
fi
if [ "$DEVICE" = cuda ]; then
  step bench "$(limit 120)" "$PY" benchmarks/bench_kernels.py --device cuda --n 16384 --repeat 10 --out "$BENCH_JSON"
else
  step bench "$(limit 120)" "$PY" benchmarks/bench_kernels.py --device cpu --quick --out "$BENCH_JSON"
fi

"$PY" - "$STEPS" "$LOGS" "$SUMMARY" "$BENCH_JSON" "$DEVICE" <<'PYEOF'
import json, os, sys
steps_tsv, logs, summary, bench, device = sys.argv[1:]
steps = []
for line in open(steps_tsv):
    name, rc, secs, cmd = line.rstrip("\n").split("\t", 3)
    log = os.path.join(logs, name + ".log")
    tail = open(log).read()[-4000:] if os.path.exists(log) else ""
    steps.append(dict(step=name, rc=rc if rc == "skipped" else int(rc), seconds=round(float(secs), 1), cmd=cmd, log_tail=tail))
ok = all(s["rc"] in (0, "skipped") for s in steps)
out = dict(device=device, ok=ok, env=open(os.path.join(logs, "env.log")).read(), steps=steps,
           bench_json=bench if os.path.exists(bench) else None,
           note=None if device == "cuda" else "CPU dry run of the GPU script: no GPU figure")
os.makedirs(os.path.dirname(summary), exist_ok=True)
json.dump(out, open(summary, "w"), indent=1)
print(f"{'OK' if ok else 'FAILED'}: " + ", ".join(f"{s['step']}={s['rc']} ({s['seconds']}s)" for s in steps))
print("wrote", summary)
sys.exit(0 if ok else 1)
PYEOF
rc=$?
if [ -n "${OUT:-}" ]; then
  cp "$SUMMARY" "$OUT/" 2>/dev/null; [ -f "$BENCH_JSON" ] && cp "$BENCH_JSON" "$OUT/"
  for f in "$LOGS"/*.log; do cp "$f" "$OUT/gpu_check_$(basename "$f")"; done
fi
rm -rf "$LOGS"
exit $rc
