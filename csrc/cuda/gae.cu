// CUDA registrations of gae / gae_packed (kernel: gae.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_launcher.h"
#include "cuda/gae_op.h"

namespace rlhf_engine {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  return ops::gae_op(ops::CudaLauncher{}, rewards, values, mask, gamma, lam);
}

std::tuple<at::Tensor, at::Tensor> gae_packed_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& offsets, double gamma, double lam) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  return ops::gae_packed_op(ops::CudaLauncher{}, rewards, values, offsets, gamma, lam);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("gae_packed", &gae_packed_cuda);
}

}  // namespace rlhf_engine
