"""Loads the compiled kernel library `rlhf_engine._C` (registers the `rlhf_engine::*` ops)."""

from __future__ import annotations

import torch


def load_library() -> None:
    """Import `rlhf_engine._C`, whose load registers the ops with the dispatcher.

    Raises ImportError with the build command when the extension has not been built.
    """
    try:
        import rlhf_engine._C  # noqa: F401  (the import registers the ops)
    except ImportError as e:
        raise ImportError(
            "the compiled kernel extension rlhf_engine._C could not be imported "
            f"({e}); build it with `make build` "
            "(or `pip install --no-build-isolation --no-deps -e .`) in the project root"
        ) from e


def float_dtype_check(name: str, t: torch.Tensor) -> None:
    """TypeError unless `t` is a tensor of a dtype the kernels take (fp32, bf16, fp16, fp64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' output/accumulation dtype for an input dtype: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_kernels_built() -> bool:
    """Whether the loaded rlhf_engine._C has CUDA kernels (built with RLHF_ENGINE_CUDA=1 on a CUDA torch)."""
    load_library()
    return "cuda" in torch.ops.rlhf_engine.build_info()


def check_tensor_device(name: str, t: torch.Tensor, cuda_built: bool) -> None:
    """A clear error for a tensor on a device the kernels do not run on (cuda_built: cuda_kernels_built())."""
    if t.device.type == "cuda" and not cuda_built:
        raise RuntimeError(
            f"{name} is on {t.device} but rlhf_engine._C was built without CUDA kernels; "
            "rebuild it with RLHF_ENGINE_CUDA=1 on a CUDA build of torch (README: CUDA build)"
        )
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} is on {t.device}; the kernels run on cpu and cuda")


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """torch.device(device), or a RuntimeError naming `name` when CUDA is asked for and cannot run."""
    d = torch.device(device)
    if d.type == "cuda":
        if torch.version.cuda is None:
            raise RuntimeError(
                f"{name}={str(device)!r} needs CUDA, but torch {torch.__version__} is a CPU-only build "
                "(torch.version.cuda is None)"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{name}={str(device)!r} needs CUDA, but no CUDA device is visible to torch {torch.__version__} "
                "(torch.cuda.is_available() is False)"
            )
        if not cuda_kernels_built():
            raise RuntimeError(f"{name}={str(device)!r}: rlhf_engine._C was built without CUDA kernels")
    elif d.type != "cpu":
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:i]', got {str(device)!r}")
    return d


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """IndexError naming the first label outside [0, vocab) that is not ignore_index.

    One reduction over the labels; on CUDA reading its result is a device sync.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))  # [N]
    if bool(bad.any()):  # device sync on CUDA
        i = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"labels[{i}] = {int(labels[i])} is out of range for V = {vocab} (and is not ignore_index = {ignore_index})"
        )
