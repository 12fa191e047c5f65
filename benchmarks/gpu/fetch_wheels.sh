#!/usr/bin/env bash
# Fetches the wheels that the GPU machine's image lacks, for benchmarks/gpu/run.sh to install there.
#
# The image (Python 3.12, torch 2.11.0+cu130, transformers 5.17; see shared/FACTS.md and the device
# KINDS.md package list) already holds torch, transformers, peft, safetensors, tokenizers, numpy,
# pyyaml, tqdm, matplotlib and pytest. What `rlhf_engine` and the engine's processes import beyond
# that (read from the imports under rlhf_engine/ against pyproject's dependencies):
#   pyzmq    transport/* (sockets, CURVE auth)        no dependencies on CPython
#   msgspec  transport/wire.py (the typed headers)    no dependencies
# Not fetched: vllm (not part of the GPU check), and the lazily imported optional extras gguf,
# datasets and wandb, which no step of run.sh uses.
#
# Versions are those of the project's venv. The wheels are cp312 x86-64: msgspec publishes
# manylinux2014 / manylinux_2_17 / manylinux_2_28 tags, pyzmq an abi3 wheel tagged
# manylinux_2_26 / manylinux_2_28; the platforms below cover both.
#
# Usage: benchmarks/gpu/fetch_wheels.sh      (writes benchmarks/gpu/wheels/, ignored by git)
# Prints the path that must travel with the working tree (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=benchmarks/gpu/wheels
WHEELS=(pyzmq==27.3.0 msgspec==0.23.0)
LIMIT_MIB=8  # the whole tree may carry 64 MiB; the wheels should take a small part of it

rm -rf "$DIR"
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" "${WHEELS[@]}"

n=$(ls "$DIR"/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "fetch_wheels: expected ${#WHEELS[@]} wheels (${WHEELS[*]}), got $n in $DIR" >&2
  exit 1
fi
bytes=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"/*.whl
echo "total: $bytes bytes ($((bytes / 1024)) KiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "fetch_wheels: $bytes bytes of wheels is over the ${LIMIT_MIB} MiB set aside for them" >&2
  exit 1
fi
echo "carry: $DIR"
