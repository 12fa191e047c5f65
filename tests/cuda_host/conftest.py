"""Builds the host-backend test extension once (cached under build/cuda_host) for these tests."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent


def build_host_extension():
    """Compiles csrc/host + the CUDA op code + the race kernels with g++ (first run ~1 min)."""
    from torch.utils.cpp_extension import load

    build_dir = ROOT / "build" / "cuda_host"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="rlhf_engine_cuda_host",
        sources=[
            str(ROOT / "csrc" / "host" / "runtime.cpp"),
            str(ROOT / "csrc" / "host" / "host_ops.cpp"),
            str(HERE / "module.cpp"),
        ],
        extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
        extra_cflags=["-O2", "-std=c++20", "-DRLHF_HOST_BACKEND", "-Wall"],
        build_directory=str(build_dir),
        verbose=False,
    )


@pytest.fixture(scope="session")
def host():
    """The test extension: CUDA kernels running on the host backend."""
    return build_host_extension()
