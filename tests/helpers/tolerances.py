"""Per-dtype tolerances of the kernels against the fp32/fp64 references.

Forward outputs are fp32 for fp32/bf16/fp16 inputs (the kernel and the reference read the same
rounded inputs, so only the exp approximation and the summation order differ); gradients are
stored in the input dtype, so they carry its rounding (bf16: 2^-8 relative, fp16: 2^-11). The fp32 gradient atol covers
the rounding of z = x / T at |z| ~ 10 (the backward's p = exp(z - lse) is then off by ~1e-6).
"""

import torch

FWD = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=5e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=5e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-5, rtol=1e-5),
}
GRAD = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=5e-6, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-6, rtol=8e-3),
    torch.float16: dict(atol=1e-6, rtol=1e-3),
}
