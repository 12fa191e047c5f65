#!/usr/bin/env bash
# The one-shot GPU check (`make gpu-check`; benchmarks/gpu/README.md says what travels and the command), for an
# H100/H200 machine whose image has torch+CUDA, nvcc, ninja and compute-sanitizer. Steps, each with a time
# limit (seconds on the GPU, LIMITS below; 540 s = 9 min in all), each logged; a failed step is recorded and
# the next one runs:
#   wheels     pyzmq and msgspec from benchmarks/gpu/wheels (fetch_wheels.sh) into a fresh folder put first
#              on PYTHONPATH, where $PY cannot import them already (the image has neither)
#   build      the extension in place, RLHF_ENGINE_CUDA=1 (sm_80 + sm_90a; flags in setup.py), timed, then
#              imported: build_info() must say cpu+cuda
#   tests      tests/ops on the device (the `device` fixture runs cuda cases when a GPU is visible)
#   memcheck, racecheck   compute-sanitizer over a small subset of the op tests (cuda cases, every kernel),
#              torch's caching allocator off so that out-of-bounds accesses hit real bounds
#   kernels    benchmarks/bench_kernels.py: log-probs at N = 16384, V = 32000, 49152, 151936, fp32 and bf16,
#              beside the measured HBM copy floor; logprobs_from_hidden against the eager LM head (time and
#              peak memory) at N = 16384 for SmolLM2 (576 x 49152), Qwen2.5-0.5B (896 x 151936), 512 x 32000
#   trainer    benchmarks/gpu/trainer_step.py: a PPO step of SmolLM2-135M- and Qwen2.5-0.5B-shaped models
#              (random weights, bf16, packed micro-batches), logprobs_from_hidden on and off: tokens/s, peak
#              memory, MFU against the measured bf16 matmul rate
#   engine     benchmarks/gpu/engine_e2e.py: the engine end to end, trainer and transformers generator
#              processes on the one GPU, sync and async: samples/s, weight-sync time per version
# Results: ONE JSON, gpu_check_<device>_<time>.json (machine, versions, each step's rc, seconds, limit, log
# tail and figures; rewritten after every step), one log with every step's output, and the engine's timeline
# PNG, in --out: $OUT when set (the device tool brings it back), else benchmarks/results (a dry run:
# /tmp/gpu_check_dry_run). Exit status: non-zero if any step failed.
#
# Usage: benchmarks/gpu/run.sh [--device cuda|cpu] [--image] [--python PY] [--out DIR] [--skip-build]
#   --device cpu   dry run of every step on the CPU, in a fresh copy of the working tree (what the device tool
#                  sends: tracked and untracked-not-ignored files, plus benchmarks/gpu/wheels), so that the
#                  checkout's own build is never touched: CPU build, tests on cpu, the sanitizer subset without
#                  the sanitizer, the benchmarks at --quick sizes. Python: .venv's.
#   --image        the dry run with the GPU image's versions: --device cpu with .venv-image's Python 3.12,
#                  torch 2.11 and transformers 5.17, without pyzmq and msgspec, which come from the wheels as
#                  they will on the GPU (`make image-venv`, `benchmarks/gpu/fetch_wheels.sh` first)
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -n "${EPOCHREALTIME:-}" ] || { echo "run.sh: needs bash >= 5 (EPOCHREALTIME), this is $BASH_VERSION" >&2; exit 2; }

DEVICE=cuda
PY=
IMAGE=0
BUILD=1
OUTDIR=${OUT:-}
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --image) IMAGE=1; DEVICE=cpu; shift ;;
    --python) PY=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$PY" ]; then
  if [ "$IMAGE" = 1 ]; then PY=.venv-image/bin/python
  elif [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
  else PY=python3; fi
fi
# A dry run's results stay out of the tree (benchmarks/results would travel to the GPU with it).
OUTDIR=${OUTDIR:-$([ "$DEVICE" = cuda ] && echo benchmarks/results || echo "${TMPDIR:-/tmp}/gpu_check_dry_run")}
mkdir -p "$OUTDIR" || exit 2

# A dry run goes on in a fresh copy of the tree, as the device tool would send it, with a clean environment.
if [ "$DEVICE" = cpu ] && [ -z "${GPU_CHECK_IN_COPY:-}" ]; then
  [ "$IMAGE" = 0 ] || [ -x "$PY" ] || { echo "run.sh --image: no $PY; run \`make image-venv\`" >&2; exit 2; }
  [[ "$PY" = */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute; a venv's link kept
  COPY=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_tree.XXXXXX")
  git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$COPY" \
    || { echo "run.sh: copying the tree into $COPY failed" >&2; exit 1; }
  [ -d benchmarks/gpu/wheels ] && cp -r benchmarks/gpu/wheels "$COPY/benchmarks/gpu/"  # what `carry` names
  echo "dry run in a copy of the tree: $COPY (python: $PY)"
  env -u PYTHONPATH GPU_CHECK_IN_COPY=1 GPU_CHECK_COMMIT="$(git rev-parse HEAD 2>/dev/null)" \
    "$COPY/benchmarks/gpu/run.sh" "${ARGS[@]}" --python "$PY" \
    --out "$(realpath "$OUTDIR")"
  rc=$?
  rm -rf "$COPY"
  exit $rc
fi

# Time limits per step, seconds on the GPU: 540 in all (9 minutes), checked below. The CPU dry run gets 8
# times as long (2 shared cores, no GPU).
declare -A LIMITS=([wheels]=20 [build]=110 [tests]=70 [memcheck]=50 [racecheck]=40 [kernels]=70 [trainer]=75
                   [engine]=105)
TOTAL=0; for s in "${!LIMITS[@]}"; do TOTAL=$((TOTAL + LIMITS[$s])); done
[ "$TOTAL" -le 540 ] || { echo "run.sh: the step limits add up to $TOTAL s, over 540" >&2; exit 2; }
SCALE=$([ "$DEVICE" = cuda ] && echo 1 || echo 8)
limit() { echo $((LIMITS[$1] * SCALE)); }

TAG=${DEVICE}$([ "$IMAGE" = 1 ] && echo _image)_$(date -u +%Y-%m-%dT%H%M%S)
SUMMARY="$OUTDIR/gpu_check_$TAG.json"
ALL_LOG="$OUTDIR/gpu_check_$TAG.log"
PNG="$OUTDIR/gpu_check_${TAG}_timeline.png"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: > "$LOGS/steps.tsv"
: > "$ALL_LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# step NAME CMD...: runs CMD with NAME's time limit, logs to $LOGS/NAME.log (and the run's log), records rc and
# seconds, and rewrites the summary JSON. A step that measures something writes $LOGS/NAME.json.
step() {
  local name=$1 lim; lim=$(limit "$1"); shift
  echo "== $name (limit ${lim} s): $*" | tee -a "$ALL_LOG"
  local t0=${EPOCHREALTIME/./}  # microseconds (bash 5; no bc needed)
  timeout -k 10 "$lim" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local us=$((${EPOCHREALTIME/./} - t0))
  local secs; secs=$((us / 1000000)).$(printf %06d $((us % 1000000)))
  { head -c 200000 "$LOGS/$name.log"; echo; echo "== $name: rc=$rc in ${secs} s"; } >> "$ALL_LOG"
  tail -n 12 "$LOGS/$name.log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$lim" "$*" >> "$LOGS/steps.tsv"
  echo "== $name: rc=$rc in ${secs} s"
  "$PY" benchmarks/gpu/summary.py "$LOGS" "$SUMMARY" "$DEVICE" > /dev/null
}

skip() {  # skip NAME WHY
  echo "== $1: skipped ($2)" | tee -a "$ALL_LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "skipped" "0" "0" "$2" >> "$LOGS/steps.tsv"
  "$PY" benchmarks/gpu/summary.py "$LOGS" "$SUMMARY" "$DEVICE" > /dev/null
}

# The machine and versions, into $LOGS/env.json.
if [ "$DEVICE" = cuda ]; then
  export RLHF_ENGINE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
  [ -n "$NVCC" ] && export CUDA_HOME=${CUDA_HOME:-$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
else
  export RLHF_ENGINE_CUDA=0 CUDA_VISIBLE_DEVICES=""
  NVCC= SAN=
fi
"$PY" - "$LOGS/env.json" "$DEVICE" "$IMAGE" "${NVCC:-}" "${SAN:-}" <<'PYEOF' 2>&1 | tee -a "$ALL_LOG"
import json, os, platform, subprocess, sys
out, device, image, nvcc, san = sys.argv[1:]
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc!r}"
env = dict(device=device, image_imitation=image == "1", python=platform.python_version(), machine=platform.node(),
           cpus=os.cpu_count(), started=run("date", "-u", "+%Y-%m-%dT%H:%M:%SZ"),
           git_commit=run("git", "rev-parse", "HEAD") or os.environ.get("GPU_CHECK_COMMIT"), nvcc=(run(nvcc, "--version") or "").splitlines()[-1:] if nvcc else None,
           compute_sanitizer=(run(san, "--version") or "").splitlines()[-1:] if san else None,
           nvidia_smi=run("nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader") if device == "cuda" else None)
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count)
    import transformers
    env["transformers"] = transformers.__version__
except Exception as exc:  # recorded; the steps say what fails
    env["import_error"] = repr(exc)
json.dump(env, open(out, "w"), indent=1)
print(json.dumps(env))
PYEOF

# 1. the packages the image lacks (pyzmq, msgspec), from the wheels fetch_wheels.sh fetched here (carried as
#    benchmarks/gpu/wheels), installed into a fresh folder put first on PYTHONPATH (child processes inherit it)
WHEELS=benchmarks/gpu/wheels
if "$PY" -c "import zmq, msgspec" 2>/dev/null; then
  skip wheels "zmq and msgspec already importable by $PY"
elif ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$LOGS/site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$LOGS/site:$PYTHONPATH"
else
  step wheels sh -c "echo 'zmq/msgspec missing and no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh here and carry $WHEELS'; exit 1"
fi

# 2. build, then import: on cuda the extension must have its CUDA kernels
if [ "$BUILD" = 1 ]; then
  WANT=$([ "$DEVICE" = cuda ] && echo cpu+cuda || echo cpu)
  step build sh -c "'$PY' setup.py -q build_ext --inplace && '$PY' -c \"import torch, rlhf_engine.ops; \
b = torch.ops.rlhf_engine.build_info(); print('build_info', b); assert b == '$WANT', f'build_info {b!r}, expected $WANT'\""
else
  skip build "--skip-build"
fi

# 3. tests/ops on the device (-k: the other device's cases out)
OTHER=$([ "$DEVICE" = cuda ] && echo cpu || echo cuda)
step tests "$PY" -m pytest tests/ops -q -p no:cacheprovider -m "not slow" -rfE --durations 10 -k "not $OTHER"

# 4. compute-sanitizer over a small subset: small shapes, every kernel (log-probs fwd/bwd, the in-place
#    backward through logprobs_from_hidden (hand-computed, tied, frozen weight, chunk size, gradcheck), KL, GAE)
SAN_TESTS=(tests/ops/test_ops_logprobs.py tests/ops/test_ops_hidden_logprobs.py tests/ops/test_ops_token_kl.py
           tests/ops/test_ops_gae.py)
SAN_K="$DEVICE and (hand_computed or gradcheck or custom_ignore or tied or frozen_weight or chunk_size or full_kl_of_identical or packed)"
if [ "$DEVICE" = cuda ]; then
  for tool in memcheck racecheck; do
    if [ -n "$SAN" ]; then
      step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 9 \
        "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider -rfE -k "$SAN_K"
    else
      step "$tool" sh -c "echo 'compute-sanitizer not found'; exit 127"
    fi
  done
else
  # The same selection without the sanitizer: checks that it selects tests and that they pass.
  step memcheck "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider -rfE -k "$SAN_K"
  skip racecheck "compute-sanitizer needs a GPU; the selection ran in the memcheck step without it"
fi

# 5. kernels against the HBM copy floor (the same options on the CPU, at toy sizes)
VOCABS=32000,49152,151936
if [ "$DEVICE" = cuda ]; then
  step kernels "$PY" benchmarks/bench_kernels.py --device cuda --n 16384 --repeat 5 --vocabs "$VOCABS" \
    --hidden-shapes 16384x512x32000,16384x576x49152,16384x896x151936 --out "$LOGS/kernels.json"
else
  step kernels "$PY" benchmarks/bench_kernels.py --device cpu --quick --vocabs "$VOCABS" \
    --hidden-shapes 256x64x49152 --hidden-dtypes bfloat16 --out "$LOGS/kernels.json"
fi

# 6. a PPO trainer step on real-shape models; 7. the engine end to end
QUICK=$([ "$DEVICE" = cpu ] && echo --quick)
step trainer "$PY" benchmarks/gpu/trainer_step.py --device "$DEVICE" $QUICK --out "$LOGS/trainer.json"
step engine "$PY" benchmarks/gpu/engine_e2e.py --device "$DEVICE" $QUICK --budget-s $(($(limit engine) - 15)) \
  --work-dir "$LOGS/engine" --timeline "$PNG" --out "$LOGS/engine.json"

"$PY" benchmarks/gpu/summary.py "$LOGS" "$SUMMARY" "$DEVICE"
rc=$?
"$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print(('OK' if s['ok'] else 'FAILED') + ': ' + ', '.join(
    f\"{x['step']}={x['rc']} ({x['seconds']} s of {x['limit_s']})\" for x in s['steps']))" "$SUMMARY"
echo "wrote $SUMMARY, $ALL_LOG$([ -f "$PNG" ] && echo ", $PNG")"
rm -rf "$LOGS"
exit $rc
