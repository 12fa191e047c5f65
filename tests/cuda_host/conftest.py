"""Builds the host-backend test extension once per version of its sources, for these tests."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
SOURCES = [ROOT / "csrc" / "host" / "runtime.cpp", HERE / "module.cpp"]  # module.cpp includes host/host_ops.cpp
CFLAGS = ["-O2", "-std=c++20", "-DRLHF_HOST_BACKEND", "-Wall"]


def sources_key() -> str:
    """A hash of what the build reads: the sources, every header they may include (csrc/cuda, csrc/host and this
    folder's), the flags and the torch version."""
    import torch

    files = sorted({*SOURCES, *(ROOT / "csrc").glob("cuda/*"), *(ROOT / "csrc").glob("host/*"), *HERE.glob("*.cuh")})
    digest = hashlib.sha256(f"{CFLAGS} {torch.__version__}".encode())
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_host_extension():
    """Compiles csrc/host + the CUDA op code + the race kernels with g++ into
    .cache/cuda_host/<hash of the sources>: later runs with the same sources load that build."""
    from torch.utils.cpp_extension import load

    build_dir = ROOT / ".cache" / "cuda_host" / sources_key()
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="rlhf_engine_cuda_host",
        sources=[str(p) for p in SOURCES],
        extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
        extra_cflags=CFLAGS,
        build_directory=str(build_dir),
        verbose=False,
    )


@pytest.fixture(scope="session")
def host():
    """The test extension: CUDA kernels running on the host backend."""
    return build_host_extension()
