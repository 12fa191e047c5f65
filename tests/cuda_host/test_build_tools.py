"""csrc/tools: the nvcc flags and block sizes come from one source; the registration check of
`make cuda-build` flags a missing kernel; cuda-check skips cleanly without nvcc."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

sys.path.insert(0, str(ROOT / "csrc" / "tools"))
import cuda_build  # noqa: E402
import cuda_check  # noqa: E402


def test_nvcc_flags_and_block_sizes_are_read_from_their_one_source():
    setup_py = (ROOT / "setup.py").read_text()
    assert 'NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]' in setup_py
    assert cuda_check.NVCC_FLAGS[:3] == ["-O3", "-std=c++17", "--use_fast_math"]
    assert cuda_check.CUDA_ARCHS == ["80", "90a"]
    op_h = (ROOT / "csrc" / "cuda" / "logprobs_op.h").read_text()
    assert int(re.search(r"kRowThreadsMax = (\d+);", op_h).group(1)) == cuda_check.ROW_THREADS == 512
    blocks = {k.name: k.block for ks in cuda_check.KERNELS.values() for k in ks}
    assert blocks["logprobs_fwd_kernel"] == cuda_check.ROW_THREADS
    assert blocks["gae_kernel"] == cuda_check.GAE_THREADS == 256


def test_registration_check_flags_missing_kernels():
    full = dict(CPU=True, CUDA=True, Meta=True, Autograd=True)
    ops = {
        "rlhf_engine::build_info": dict(CPU=False, CUDA=False, Meta=False, Autograd=False),  # no kernels: skipped
        "rlhf_engine::a_fwd": dict(full, Autograd=False),  # has a_bwd: needs Autograd
        "rlhf_engine::a_bwd": dict(full, Autograd=False),
        "rlhf_engine::gae": dict(full, CUDA=False, Autograd=False),  # no backward op: no Autograd needed
    }
    assert cuda_build.registration_problems(ops) == [
        "rlhf_engine::a_fwd: no Autograd kernel (it has a backward op)",
        "rlhf_engine::gae: no CUDA kernel",
    ]


def test_cuda_check_skips_without_nvcc():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = os.path.dirname(sys.executable)  # python only: no nvcc
    tool = str(ROOT / "csrc" / "tools" / "cuda_check.py")
    r = subprocess.run([sys.executable, tool, "--skip-without-nvcc"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cuda-check SKIPPED: nvcc not found")
    r = subprocess.run([sys.executable, tool], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "nvcc not found" in r.stderr


@pytest.mark.skipif(not cuda_check.nvcc_candidates(), reason="no nvcc here")
def test_cuda_home_is_the_toolkit_not_the_wrapper_folder():
    home = cuda_check.find_cuda_home()
    assert os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    assert os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)
