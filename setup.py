"""Build the `rlhf_engine._C` kernel extension.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda/*.cu) are built
when torch has CUDA and nvcc is present; `RLHF_ENGINE_CUDA` overrides this:
  auto (default) - build CUDA when possible
  0              - never build CUDA
  1              - require CUDA; fail with a clear message when it cannot be built
`RLHF_ENGINE_CPU_ARCH` (default `native`) is passed as `-march=` to the C++ compiler;
the extension is built on the machine that runs it (editable install), so `native`
gives the widest vectors. Set e.g. `x86-64-v3` to build a portable binary.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    arch = os.environ.get("RLHF_ENGINE_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={arch}", "-DRLHF_ENGINE_CPU"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _cuda_requested():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = [
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "-DRLHF_ENGINE_CUDA",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90a,code=sm_90a",
        ]
        return [
            CUDAExtension(
                "rlhf_engine._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DRLHF_ENGINE_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "rlhf_engine._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
