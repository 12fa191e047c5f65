// logprobs_fwd / logprobs_bwd on a Launcher (see op_common.h): checks, outputs, launch shape.
#pragma once

#include <tuple>

#include "cuda/logprobs.cuh"
#include "cuda/op_common.h"

namespace rlhf_engine::ops {

// Largest block of the row kernels (logprobs, full KL), used from V ~ 32k (fp32) up;
// csrc/tools/cuda_check.py reads it for its occupancy table.
constexpr int kRowThreadsMax = 512;

// Block size for one row of V elements: enough threads that each has a few 16-byte vectors.
inline int logprobs_threads(int64_t vocab, int64_t elem_bytes) {
  const int64_t vectors = vocab * elem_bytes / dev::kVecBytes;
  if (vectors >= 8 * kRowThreadsMax) return kRowThreadsMax;
  if (vectors >= 4 * 256) return 256;
  return 128;
}

inline void check_labels(const at::Tensor& labels, int64_t n) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64; got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "labels must have shape [", n, "] (one per row of logits); got ",
              labels.sizes());
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_op(const Launcher& L, const at::Tensor& logits_in,
                                                                const at::Tensor& labels_in, double inv_temperature,
                                                                int64_t ignore_index, bool with_entropy) {
  L.check_device(logits_in, "logits");
  L.check_device(labels_in, "labels");
  check_inv_temperature(inv_temperature);
  const at::Tensor logits = rows_with_unit_stride(logits_in, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_labels(labels_in, n);
  const at::Tensor labels = labels_in.contiguous();
  const auto out_options = logits.options().dtype(acc_dtype(logits));
  at::Tensor logprob = at::empty({n}, out_options);
  at::Tensor entropy = at::empty({n}, out_options);
  at::Tensor lse = at::empty({n}, out_options);
  if (n == 0) return {logprob, entropy, lse};
  dispatch_floating(logits, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::LogprobsFwdParams<T> p{};
    p.logits = ptr<T>(logits);
    p.row_stride = logits.stride(0);
    p.labels = ptr<int64_t>(labels);
    p.logprob = ptr<A>(logprob);
    p.entropy = ptr<A>(entropy);
    p.lse = ptr<A>(lse);
    p.vocab = vocab;
    p.inv_temperature = static_cast<A>(inv_temperature);
    p.ignore_index = ignore_index;
    const int threads = L.threads(logprobs_threads(vocab, logits.element_size()));
    if (with_entropy)
      L.launch(&kernels::logprobs_fwd_kernel<T, true>, n, threads, p);
    else
      L.launch(&kernels::logprobs_fwd_kernel<T, false>, n, threads, p);
  });
  return {logprob, entropy, lse};
}

// in_place: grad_logits is written over `logits` (which must then have unit stride in V and be
// the tensor the caller gave up); otherwise into a new contiguous tensor.
template <class Launcher>
at::Tensor logprobs_bwd_op(const Launcher& L, const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                           const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
                           const at::Tensor& entropy_in, double inv_temperature, int64_t ignore_index, bool in_place) {
  L.check_device(logits_in, "logits");
  L.check_device(labels_in, "labels");
  L.check_device(grad_logprob, "grad_logprob");
  L.check_device(lse_in, "lse");
  L.check_device(entropy_in, "entropy");
  check_inv_temperature(inv_temperature);
  if (in_place)
    TORCH_CHECK(logits_in.dim() == 2 && logits_in.stride(1) == 1 && logits_in.stride(0) >= logits_in.size(1),
                "in-place logprobs_bwd needs logits [N, V] with unit stride in V and disjoint rows; got shape ",
                logits_in.sizes(), " strides ", logits_in.strides());
  const at::Tensor logits = rows_with_unit_stride(logits_in, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_labels(labels_in, n);
  const at::Tensor labels = labels_in.contiguous();
  const auto acc = acc_dtype(logits);
  const at::Tensor g = row_vector(grad_logprob, n, acc, "grad_logprob");
  const bool with_entropy = grad_entropy.defined() && grad_entropy.numel() > 0;
  at::Tensor g_ent;
  if (with_entropy) {
    L.check_device(grad_entropy, "grad_entropy");
    g_ent = row_vector(grad_entropy, n, acc, "grad_entropy");
  }
  const at::Tensor lse = row_vector(lse_in, n, acc, "lse");
  const at::Tensor entropy = row_vector(entropy_in, n, acc, "entropy");
  at::Tensor grad_logits = in_place ? logits : at::empty({n, vocab}, logits.options());
  if (n == 0) return grad_logits;
  dispatch_floating(logits, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::LogprobsBwdParams<T> p{};
    p.grad_logprob = ptr<A>(g);
    p.grad_entropy = with_entropy ? ptr<A>(g_ent) : nullptr;
    p.logits = ptr<T>(logits);
    p.row_stride = logits.stride(0);
    p.labels = ptr<int64_t>(labels);
    p.lse = ptr<A>(lse);
    p.entropy = ptr<A>(entropy);
    p.grad_logits = ptr<T>(grad_logits);
    p.grad_row_stride = grad_logits.stride(0);
    p.vocab = vocab;
    p.inv_temperature = static_cast<A>(inv_temperature);
    p.ignore_index = ignore_index;
    const int threads = L.threads(logprobs_threads(vocab, logits.element_size()));
    if (with_entropy)
      L.launch(&kernels::logprobs_bwd_kernel<T, true>, n, threads, p);
    else
      L.launch(&kernels::logprobs_bwd_kernel<T, false>, n, threads, p);
  });
  return grad_logits;
}

}  // namespace rlhf_engine::ops
