#!/usr/bin/env bash
# The project against the GPU image's package versions, on the CPU (`make image-check`).
#
# The GPU image has Python 3.12, torch 2.11.0+cu130 and transformers 5.17, and no pyzmq or msgspec;
# .venv-image (made by `make image-venv`) has the same on pyenv's Python 3.12. This script
#   0. installs pyzmq and msgspec from benchmarks/gpu/wheels (fetch_wheels.sh) into a fresh folder on
#      PYTHONPATH, as benchmarks/gpu/run.sh does on the GPU;
#   1. copies the working tree (tracked and untracked-not-ignored files) into .venv-image/tree,
#      so that the build there never touches the checkout's own CPU build (rlhf_engine/_C*.so,
#      build/cpu), and builds the extension in place in that copy (CPU kernels; RLHF_ENGINE_CUDA=0);
#   2. runs tests/ops there (cpu cases);
#   3. runs a short engine run there: the sync engine with the transformers generator (real
#      generator process, real transport; vLLM is not in the image), tests/engine/test_engine.py.
# Each step is timed; the exit status is non-zero if any failed.
#
# Usage: benchmarks/gpu/image_check.sh [PYTEST_ARGS...]   (extra arguments go to both pytest runs)
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=${IMAGE_VENV:-.venv-image}
PY="$PWD/$VENV/bin/python"
TREE="$VENV/tree"
[ -x "$PY" ] || { echo "image-check: no $PY; run \`make image-venv\`" >&2; exit 2; }
"$PY" -c "import sys, torch, transformers; print('image-check: python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"

# Processes the tests start (torchrun ranks, generators) import rlhf_engine from the copy too: it is
# not installed in the venv; pyzmq and msgspec from the wheels, in a fresh folder.
SITE=$(mktemp -d "${TMPDIR:-/tmp}/image_check_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
if ! "$PY" -c "import zmq, msgspec" 2>/dev/null; then
  ls benchmarks/gpu/wheels/*.whl > /dev/null 2>&1 \
    || { echo "image-check: no wheels in benchmarks/gpu/wheels; run benchmarks/gpu/fetch_wheels.sh" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" benchmarks/gpu/wheels/*.whl \
    || { echo "image-check: installing the wheels failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD/$TREE:$SITE"
failed=()
run() {  # run NAME CMD...: in $TREE, timed
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  (cd "$TREE" && "$@")
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed+=("$name")
}

mkdir -p "$TREE"
# The checkout's files, mtimes kept, so the build in the copy is incremental. A file deleted in the
# checkout stays in the copy until `rm -rf .venv-image/tree`.
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$TREE" \
  || { echo "image-check: copying the tree into $TREE failed" >&2; exit 1; }
run build env RLHF_ENGINE_CUDA=0 "$PY" setup.py -q build_ext --inplace
run tests-ops "$PY" -m pytest tests/ops -q -p no:cacheprovider -m "not slow" -k "not cuda" "$@"
run engine "$PY" -m pytest tests/engine/test_engine.py -q -p no:cacheprovider -k "sync_resume" "$@"

if [ ${#failed[@]} -gt 0 ]; then
  echo "image-check FAILED: ${failed[*]}"
  exit 1
fi
echo "image-check OK"
