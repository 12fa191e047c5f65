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
