"""The tensor dtypes the project names in text (wire headers, safetensors files, model folders): one table.

`TORCH_DTYPES` maps our dtype names to torch dtypes (the wire's allow-list), `DTYPE_NAMES` is its
inverse, and `SAFETENSORS_DTYPES` maps the codes in safetensors headers to our names. `cpu_has_native_bf16`
says whether this CPU computes bf16 in hardware; `warn_if_bf16_is_emulated` warns a bf16 switch that will not pay;
`autocast` is the forward passes' mixed-precision context (the PPO passes and the stages alike).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
SAFETENSORS_DTYPES: dict[str, str] = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX), which oneDNN's bf16 matmuls use;
    without it torch emulates bf16 on the CPU, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def warn_if_bf16_is_emulated(setting: str, device: torch.device) -> None:
    """A `RuntimeWarning` naming `setting` (a bf16 switch that is on) when `device` is a CPU that emulates bf16."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{setting} on a CPU without AVX-512 BF16 or AMX: torch emulates bf16 here, which is slower "
                      "than fp32", RuntimeWarning, stacklevel=3)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` in `dtype` on devices of `device_type`; a no-op context for None (the weights' dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
