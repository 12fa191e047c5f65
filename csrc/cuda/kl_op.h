// token_kl_fwd / token_kl_bwd / full_kl_fwd / full_kl_bwd on a Launcher (see op_common.h).
#pragma once

#include <tuple>

#include "cuda/kl.cuh"
#include "cuda/logprobs_op.h"
#include "cuda/op_common.h"

namespace rlhf_engine::ops {

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "kind must be 0 (kl), 1 (abs), 2 (mse) or 3 (k3); got ", kind);
}

template <class Launcher> int64_t elementwise_grid(const Launcher& L, int64_t n) {
  const int64_t blocks = (n + kernels::kTokenKlThreads - 1) / kernels::kTokenKlThreads;
  return blocks < L.max_grid_blocks() ? blocks : L.max_grid_blocks();
}

template <class Launcher>
at::Tensor token_kl_fwd_op(const Launcher& L, const at::Tensor& logp_in, const at::Tensor& ref_in, int64_t kind) {
  L.check_device(logp_in, "logp");
  L.check_device(ref_in, "ref_logp");
  check_kind(kind);
  check_same_shape(logp_in, "logp", ref_in, "ref_logp");
  check_same_dtype(logp_in, "logp", ref_in, "ref_logp");
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous();
  at::Tensor out = at::empty_like(logp, at::MemoryFormat::Contiguous);
  if (logp.numel() == 0) return out;
  dispatch_floating(logp, "logp", [&](auto tag) {
    using T = typename decltype(tag)::type;
    kernels::TokenKlParams<T> p{};
    p.logp = ptr<T>(logp);
    p.ref_logp = ptr<T>(ref);
    p.out = ptr<T>(out);
    p.n = logp.numel();
    p.kind = static_cast<int>(kind);
    L.launch(&kernels::token_kl_fwd_kernel<T>, elementwise_grid(L, p.n), kernels::kTokenKlThreads, p);
  });
  return out;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> token_kl_bwd_op(const Launcher& L, const at::Tensor& grad_in,
                                                   const at::Tensor& logp_in, const at::Tensor& ref_in, int64_t kind) {
  L.check_device(grad_in, "grad");
  L.check_device(logp_in, "logp");
  L.check_device(ref_in, "ref_logp");
  check_kind(kind);
  check_same_shape(logp_in, "logp", ref_in, "ref_logp");
  check_same_shape(logp_in, "logp", grad_in, "grad");
  check_same_dtype(logp_in, "logp", ref_in, "ref_logp");
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous();
  const at::Tensor grad = grad_in.to(logp.scalar_type()).contiguous();
  at::Tensor g_logp = at::empty_like(logp, at::MemoryFormat::Contiguous);
  at::Tensor g_ref = at::empty_like(logp, at::MemoryFormat::Contiguous);
  if (logp.numel() == 0) return {g_logp, g_ref};
  dispatch_floating(logp, "logp", [&](auto tag) {
    using T = typename decltype(tag)::type;
    kernels::TokenKlParams<T> p{};
    p.grad = ptr<T>(grad);
    p.logp = ptr<T>(logp);
    p.ref_logp = ptr<T>(ref);
    p.out = ptr<T>(g_logp);
    p.grad_ref = ptr<T>(g_ref);
    p.n = logp.numel();
    p.kind = static_cast<int>(kind);
    L.launch(&kernels::token_kl_bwd_kernel<T>, elementwise_grid(L, p.n), kernels::kTokenKlThreads, p);
  });
  return {g_logp, g_ref};
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_fwd_op(const Launcher& L, const at::Tensor& logits_in,
                                                               const at::Tensor& ref_in, double inv_temperature) {
  L.check_device(logits_in, "logits");
  L.check_device(ref_in, "ref_logits");
  check_inv_temperature(inv_temperature);
  check_same_shape(logits_in, "logits", ref_in, "ref_logits");
  check_same_dtype(logits_in, "logits", ref_in, "ref_logits");
  const at::Tensor logits = rows_with_unit_stride(logits_in, "logits");
  const at::Tensor ref = rows_with_unit_stride(ref_in, "ref_logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto out_options = logits.options().dtype(acc_dtype(logits));
  at::Tensor kl = at::empty({n}, out_options), lse = at::empty({n}, out_options), ref_lse = at::empty({n}, out_options);
  if (n == 0) return {kl, lse, ref_lse};
  dispatch_floating(logits, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::FullKlFwdParams<T> p{};
    p.logits = ptr<T>(logits);
    p.ref_logits = ptr<T>(ref);
    p.row_stride = logits.stride(0);
    p.ref_row_stride = ref.stride(0);
    p.kl = ptr<A>(kl);
    p.lse = ptr<A>(lse);
    p.ref_lse = ptr<A>(ref_lse);
    p.vocab = vocab;
    p.inv_temperature = static_cast<A>(inv_temperature);
    L.launch(&kernels::full_kl_fwd_kernel<T>, n, L.threads(logprobs_threads(vocab, logits.element_size())), p);
  });
  return {kl, lse, ref_lse};
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> full_kl_bwd_op(const Launcher& L, const at::Tensor& grad_in,
                                                  const at::Tensor& logits_in, const at::Tensor& ref_in,
                                                  const at::Tensor& kl_in, const at::Tensor& lse_in,
                                                  const at::Tensor& ref_lse_in, double inv_temperature, bool ref_grad) {
  L.check_device(grad_in, "grad");
  L.check_device(logits_in, "logits");
  L.check_device(ref_in, "ref_logits");
  L.check_device(kl_in, "kl");
  L.check_device(lse_in, "lse");
  L.check_device(ref_lse_in, "ref_lse");
  check_inv_temperature(inv_temperature);
  check_same_shape(logits_in, "logits", ref_in, "ref_logits");
  check_same_dtype(logits_in, "logits", ref_in, "ref_logits");
  const at::Tensor logits = rows_with_unit_stride(logits_in, "logits");
  const at::Tensor ref = rows_with_unit_stride(ref_in, "ref_logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto acc = acc_dtype(logits);
  const at::Tensor grad = row_vector(grad_in, n, acc, "grad");
  const at::Tensor kl = row_vector(kl_in, n, acc, "kl");
  const at::Tensor lse = row_vector(lse_in, n, acc, "lse");
  const at::Tensor ref_lse = row_vector(ref_lse_in, n, acc, "ref_lse");
  at::Tensor g_logits = at::empty({n, vocab}, logits.options());
  at::Tensor g_ref = ref_grad ? at::empty({n, vocab}, logits.options()) : at::empty({0}, logits.options());
  if (n == 0) return {g_logits, g_ref};
  dispatch_floating(logits, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::FullKlBwdParams<T> p{};
    p.grad = ptr<A>(grad);
    p.logits = ptr<T>(logits);
    p.ref_logits = ptr<T>(ref);
    p.row_stride = logits.stride(0);
    p.ref_row_stride = ref.stride(0);
    p.kl = ptr<A>(kl);
    p.lse = ptr<A>(lse);
    p.ref_lse = ptr<A>(ref_lse);
    p.grad_logits = ptr<T>(g_logits);
    p.grad_ref_logits = ref_grad ? ptr<T>(g_ref) : nullptr;
    p.vocab = vocab;
    p.inv_temperature = static_cast<A>(inv_temperature);
    const int threads = L.threads(logprobs_threads(vocab, logits.element_size()));
    if (ref_grad)
      L.launch(&kernels::full_kl_bwd_kernel<T, true>, n, threads, p);
    else
      L.launch(&kernels::full_kl_bwd_kernel<T, false>, n, threads, p);
  });
  return {g_logits, g_ref};
}

}  // namespace rlhf_engine::ops
