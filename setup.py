"""Build the `rlhf_engine._C` kernel extension.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda/*.cu) are built
when torch has CUDA and nvcc is present; `RLHF_ENGINE_CUDA` overrides this:
  auto (default) - build CUDA when possible
  0              - never build CUDA
  1              - require CUDA; fail with a clear message when it cannot be built
`RLHF_ENGINE_CPU_ARCH` (default `native`) is passed as `-march=` to the C++ compiler;
the extension is built on the machine that runs it (editable install), so `native`
gives the widest vectors. Set e.g. `x86-64-v3` to build a portable binary.

The CUDA build (RLHF_ENGINE_CUDA=1) uses build/cuda as its build folder and the CPU-only build
build/cpu, so that the two never share object files; `make cuda-build` installs the CUDA build
into .venv-cuda (non-editable) while the CPU build stays in place in rlhf_engine/.
NVCC_FLAGS and CUDA_ARCHS below are the only copy of the nvcc flags: csrc/tools/cuda_check.py
reads them from this file (as literals, without running it).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc flags of every CUDA translation unit, and the GPU architectures compiled for.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]
CUDA_ARCHS = ["80", "90a"]


def gencode_flags(archs: list[str]) -> list[str]:
    """-gencode flags for real-architecture code (SASS) of each arch, e.g. 90a -> sm_90a."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _cuda_requested() -> bool:
    mode = os.environ.get("RLHF_ENGINE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RLHF_ENGINE_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    have_cuda = have_cuda and shutil.which("nvcc", path=os.path.join(CUDA_HOME or "", "bin")) is not None
    if mode == "1" and not have_cuda:
        raise SystemExit(
            "RLHF_ENGINE_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
            "Install a CUDA build of torch and the CUDA toolkit (nvcc), or use RLHF_ENGINE_CUDA=auto|0."
        )
    return have_cuda


def _extensions() -> tuple[list, bool]:
    """The extension to build, and whether it has CUDA kernels."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    arch = os.environ.get("RLHF_ENGINE_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={arch}", "-DRLHF_ENGINE_CPU"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _cuda_requested():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = [*NVCC_FLAGS, "-DRLHF_ENGINE_CUDA", *gencode_flags(CUDA_ARCHS)]
        return [
            CUDAExtension(
                "rlhf_engine._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DRLHF_ENGINE_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ], True
    return [
        CppExtension(
            "rlhf_engine._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ], False


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


_EXTENSIONS, _WITH_CUDA = _extensions()
setup(
    ext_modules=_EXTENSIONS,
    cmdclass={"build_ext": _build_ext()},
    options={"build": {"build_base": os.path.join("build", "cuda" if _WITH_CUDA else "cpu")}},
)
