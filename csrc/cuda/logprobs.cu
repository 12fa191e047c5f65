// CUDA registrations of logprobs_fwd / logprobs_bwd / logprobs_bwd_inplace (kernels: logprobs.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_launcher.h"
#include "cuda/logprobs_op.h"

namespace rlhf_engine {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double inv_temperature, int64_t ignore_index,
                                                                  bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ops::logprobs_fwd_op(ops::CudaLauncher{}, logits, labels, inv_temperature, ignore_index, with_entropy);
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy, const at::Tensor& logits,
                             const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                             double inv_temperature, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ops::logprobs_bwd_op(ops::CudaLauncher{}, grad_logprob, grad_entropy, logits, labels, lse, entropy,
                              inv_temperature, ignore_index, /*in_place=*/false);
}

void logprobs_bwd_inplace_cuda(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy, at::Tensor& logits,
                               const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                               double inv_temperature, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  ops::logprobs_bwd_op(ops::CudaLauncher{}, grad_logprob, grad_entropy, logits, labels, lse, entropy, inv_temperature,
                       ignore_index, /*in_place=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &logprobs_bwd_cuda);
  m.impl("logprobs_bwd_inplace", &logprobs_bwd_inplace_cuda);
}

}  // namespace rlhf_engine
