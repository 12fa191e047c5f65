// CUDA registrations of token_kl_fwd / token_kl_bwd / full_kl_fwd / full_kl_bwd (kernels: kl.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_launcher.h"
#include "cuda/kl_op.h"

namespace rlhf_engine {
namespace {

at::Tensor token_kl_fwd_cuda(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t kind) {
  const c10::cuda::CUDAGuard guard(logp.device());
  return ops::token_kl_fwd_op(ops::CudaLauncher{}, logp, ref_logp, kind);
}

std::tuple<at::Tensor, at::Tensor> token_kl_bwd_cuda(const at::Tensor& grad, const at::Tensor& logp,
                                                     const at::Tensor& ref_logp, int64_t kind) {
  const c10::cuda::CUDAGuard guard(logp.device());
  return ops::token_kl_bwd_op(ops::CudaLauncher{}, grad, logp, ref_logp, kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_fwd_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                                 double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ops::full_kl_fwd_op(ops::CudaLauncher{}, logits, ref_logits, inv_temperature);
}

std::tuple<at::Tensor, at::Tensor> full_kl_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                    const at::Tensor& ref_logits, const at::Tensor& kl,
                                                    const at::Tensor& lse, const at::Tensor& ref_lse,
                                                    double inv_temperature, bool ref_grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ops::full_kl_bwd_op(ops::CudaLauncher{}, grad, logits, ref_logits, kl, lse, ref_lse, inv_temperature,
                             ref_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) {
  m.impl("token_kl_fwd", &token_kl_fwd_cuda);
  m.impl("token_kl_bwd", &token_kl_bwd_cuda);
  m.impl("full_kl_fwd", &full_kl_fwd_cuda);
  m.impl("full_kl_bwd", &full_kl_bwd_cuda);
}

}  // namespace rlhf_engine
