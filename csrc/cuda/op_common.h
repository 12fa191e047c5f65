// ATen side shared by every op in csrc/cuda: dtype dispatch and argument checks.
//
// The op functions (logprobs_op.h, kl_op.h, gae_op.h) are templated on a Launcher, so that the
// same checks, output allocation and launch configuration run in two places:
//   CudaLauncher (csrc/cuda/cuda_launcher.cuh)  kernel<<<grid, block, 0, stream>>>, CUDA tensors
//   HostLauncher (csrc/host/host_launcher.h)     the fiber host backend, CPU tensors (tests)
// A Launcher provides:
//   void check_device(const at::Tensor&, const char* name) const;
//   int threads(int preferred) const;          // block size for the row kernels
//   int64_t max_grid_blocks() const;           // cap for grid-stride kernels
//   template <class P> void launch(void (*kernel)(P), int64_t grid, int block, const P&) const;
#pragma once

#include <ATen/ATen.h>

#include "cuda/primitives.cuh"

namespace rlhf_engine::ops {

template <class T> struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the kernel element type of `t`: float, double, dev::bf16, dev::half.
template <class F> void dispatch_floating(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    case at::kBFloat16: f(TypeTag<dev::bf16>{}); break;
    case at::kHalf: f(TypeTag<dev::half>{}); break;
    default: TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or float16; got ", t.scalar_type());
  }
}

template <class T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The dtype a kernel accumulates and outputs per-row statistics in: fp64 for fp64, else fp32.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [N, V] with unit stride in the last dimension (rows may be any distance apart).
inline at::Tensor rows_with_unit_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [N, V]; got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1, name, " must have V >= 1; got shape ", t.sizes());
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

// A per-row vector [N] in the given dtype, contiguous (gradients may arrive expanded).
inline at::Tensor row_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "]; got ", t.sizes());
  return t.to(dtype).contiguous();
}

inline void check_same_shape(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), bn, " must have the shape of ", an, " ", a.sizes(), "; got ", b.sizes());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), bn, " must have the dtype of ", an, " (", a.scalar_type(),
              "); got ", b.scalar_type());
}

inline void check_inv_temperature(double inv_temperature) {
  TORCH_CHECK(inv_temperature > 0 && inv_temperature < INFINITY,
              "inv_temperature must be positive and finite; got ", inv_temperature);
}

}  // namespace rlhf_engine::ops
