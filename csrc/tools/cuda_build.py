"""Build the whole extension against the CUDA build of torch, without a GPU (`make cuda-build`).

Run with the python of the CUDA venv (.venv-cuda, made by the Makefile). Steps, each timed:
  1. `pip install --no-build-isolation --no-deps .` with RLHF_ENGINE_CUDA=1: CPU and CUDA kernels
     (sm_80, sm_90a; flags in setup.py) in one `.so`, installed into the venv (non-editable, build
     folder build/cuda), so the CPU build in rlhf_engine/ of the checkout is left alone;
  2. in a fresh process that sees no GPU: import the installed package, require build_info
     "cpu+cuda", and check the dispatcher registrations of every kernel-bearing op
     (CPU, CUDA, Meta; Autograd for each `*_fwd` op that has a `*_bwd`);
  3. tests/ops on the CPU against the installed package: run from a copy of tests/ in a temporary
     folder with `python -P`, so neither the checkout's own rlhf_engine/ (pytest would put the
     checkout on sys.path: its `pythonpath` setting, and `tests/__init__.py`) nor its CPU build is
     importable; the step first checks which rlhf_engine that folder imports.
The toolkit lacks cusparse.h, which torch's CUDA headers include: the venv's nvidia/cu13/include
(from the CUDA torch's dependencies) supplies it through CPLUS_INCLUDE_PATH.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from cuda_check import find_cuda_home  # noqa: E402  (a sibling script, not a package)

KEYS = ("CPU", "CUDA", "Meta")
PYTEST = [sys.executable, "-P", "-m", "pytest", "tests/ops", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
# pytest settings of the copied tests (pyproject's, without `pythonpath`: that would import the checkout)
PYTEST_INI = "[pytest]\naddopts = -ra --strict-markers\nmarkers =\n    slow: long-running cases\n    vllm: needs vLLM\n"
_WHICH = "import os, rlhf_engine.ops, tests.helpers; print(os.path.dirname(rlhf_engine.ops.__file__))"

# Runs in the fresh process of step 2; prints one JSON object.
_CHECK = r"""
import json, os, torch, rlhf_engine.ops
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlhf_engine::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = {}
for n in names:
    keys = {k: has(n, k) for k in ("CPU", "CUDA", "Meta", "Autograd")}
    ops[n] = keys
print(json.dumps({
    "package": os.path.dirname(rlhf_engine.ops.__file__),
    "build_info": torch.ops.rlhf_engine.build_info(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(), "ops": ops,
}))
"""


def registration_problems(ops: dict[str, dict[str, bool]]) -> list[str]:
    """Missing dispatcher kernels: CPU/CUDA/Meta for every kernel-bearing op (one with any of
    them), Autograd for every `X_fwd` whose `X_bwd` exists."""
    problems = []
    for name, keys in ops.items():
        if not any(keys[k] for k in KEYS):
            continue  # build_info, cpu_vector_bits: plain functions, no kernels
        problems += [f"{name}: no {k} kernel" for k in KEYS if not keys[k]]
        if name.endswith("_fwd") and name[: -len("fwd")] + "bwd" in ops and not keys["Autograd"]:
            problems.append(f"{name}: no Autograd kernel (it has a backward op)")
    return problems


def cuda_include_dirs() -> list[str]:
    """The include folders of the venv's NVIDIA wheels (nvidia/cu13/include holds cusparse.h)."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def step(title: str, cmd: list[str], env: dict[str, str], cwd: str = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    shown = " ".join(a if "\n" not in a else "<script>" for a in cmd)
    print(f"cuda-build: {title}: {shown}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="stop after the registration check")
    args = parser.parse_args()
    import torch

    if torch.version.cuda is None:
        sys.exit(f"cuda-build: {sys.executable} has torch {torch.__version__} without CUDA; run `make cuda-build`")
    cuda_home = find_cuda_home()
    includes = cuda_include_dirs()
    if not includes:
        sys.exit("cuda-build: no nvidia/cu*/include in this venv (cusparse.h); install the CUDA build of torch")
    env = dict(os.environ, CUDA_HOME=cuda_home, RLHF_ENGINE_CUDA="1", CUDA_VISIBLE_DEVICES="")
    env["CPLUS_INCLUDE_PATH"] = os.pathsep.join(includes + [p for p in [os.environ.get("CPLUS_INCLUDE_PATH")] if p])
    env["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + env.get("PATH", "")
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "-q", "--no-build-isolation", "--no-deps"]
    build_s, r = step("build + install (RLHF_ENGINE_CUDA=1)", [*pip, "--force-reinstall", "."], env)
    if r.returncode != 0:
        print(r.stdout[-6000:], r.stderr[-6000:], sep="\n", file=sys.stderr)
        print(f"cuda-build FAILED: the build failed after {build_s:.0f} s", file=sys.stderr)
        return 1
    print(f"cuda-build: built and installed in {build_s:.0f} s (CUDA_HOME={cuda_home})", flush=True)

    _, r = step("registration check (no GPU visible)", [sys.executable, "-P", "-c", _CHECK], env)
    if r.returncode != 0:
        print(r.stderr[-6000:], file=sys.stderr)
        print("cuda-build FAILED: the installed extension does not import", file=sys.stderr)
        return 1
    info = json.loads(r.stdout.strip().splitlines()[-1])
    problems = registration_problems(info["ops"])
    if info["build_info"] != "cpu+cuda":
        problems.append(f"build_info is {info['build_info']!r}, expected 'cpu+cuda'")
    if not info["package"].startswith(sysconfig.get_paths()["purelib"]):
        problems.append(f"imported {info['package']}, not the copy installed in this venv")
    kernel_ops = [n for n, k in info["ops"].items() if any(k[x] for x in KEYS)]
    print(f"  torch {info['torch']} (CUDA {info['torch_cuda']}, GPU visible: {info['cuda_available']}); "
          f"{info['package']} reports {info['build_info']!r}")
    for n in kernel_ops:
        print(f"  {n:<36} " + "  ".join(f"{k}:{'yes' if v else 'NO'}" for k, v in info["ops"][n].items()))
    if problems:
        print("cuda-build FAILED:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    print(f"cuda-build: {len(kernel_ops)} kernel-bearing ops, each with CPU, CUDA and Meta kernels", flush=True)
    if args.skip_tests:
        return 0
    with tempfile.TemporaryDirectory(prefix="cuda-build-tests-") as tmp:
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tmp, "tests"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        with open(os.path.join(tmp, "pytest.ini"), "w") as f:
            f.write(PYTEST_INI)
        tmp_env = {**env, "PYTHONPATH": tmp}  # `tests.helpers`, and nothing of the checkout
        which = subprocess.run([sys.executable, "-P", "-c", _WHICH], cwd=tmp, env=tmp_env, capture_output=True,
                               text=True)
        package = which.stdout.strip()
        if which.returncode != 0 or not package.startswith(sysconfig.get_paths()["purelib"]):
            print(which.stderr[-3000:], file=sys.stderr)
            print(f"cuda-build FAILED: the tests would import {package or 'nothing'}, not the installed copy",
                  file=sys.stderr)
            return 1
        test_s, r = step(f"tests/ops on the CPU (importing {package})", PYTEST, tmp_env, cwd=tmp)
    print(r.stdout[-3000:], r.stderr[-3000:], sep="")
    if r.returncode != 0:
        print("cuda-build FAILED: tests/ops failed in the CUDA build", file=sys.stderr)
        return 1
    print(f"cuda-build OK: build {build_s:.0f} s, tests/ops {test_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
