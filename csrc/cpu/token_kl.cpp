// Per-token KL estimators between policy and reference log-probs, forward and backward.
// Semantics: csrc/ops.cpp (token_kl_fwd / token_kl_bwd). Elementwise over any shape.
#include "cpu/vec_common.h"

#include <torch/library.h>

namespace rlhf_engine::cpu {
namespace {

enum Kind : int64_t { kKl = 0, kAbs = 1, kMse = 2, kK3 = 3 };

void check_pair(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t kind, const char* op) {
  TORCH_CHECK(kind >= kKl && kind <= kK3, op, ": kind must be 0 (kl), 1 (abs), 2 (mse) or 3 (k3), got ",
              kind);
  TORCH_CHECK(at::isFloatingType(logp.scalar_type()), op, ": logp must be floating, got ",
              logp.scalar_type());
  TORCH_CHECK(ref_logp.scalar_type() == logp.scalar_type(), op, ": ref_logp dtype ",
              ref_logp.scalar_type(), " must equal logp dtype ", logp.scalar_type());
  TORCH_CHECK(ref_logp.sizes() == logp.sizes(), op, ": ref_logp shape ", ref_logp.sizes(),
              " must equal logp shape ", logp.sizes());
  TORCH_CHECK(logp.is_contiguous() && ref_logp.is_contiguous(), op,
              ": logp and ref_logp must be contiguous");
}

template <typename acc>
inline acc kl_value(acc lp, acc rf, int64_t kind) {
  const acc d = lp - rf;
  switch (kind) {
    case kKl: return d;
    case kAbs: return std::abs(d);
    case kMse: return acc(0.5) * d * d;
    default: return std::exp(-d) + d - acc(1);  // k3: exp(ref - logp) - (ref - logp) - 1
  }
}

// d kl / d logp (d kl / d ref is its negative for every kind).
template <typename acc>
inline acc kl_slope(acc lp, acc rf, int64_t kind) {
  const acc d = lp - rf;
  switch (kind) {
    case kKl: return acc(1);
    case kAbs: return static_cast<acc>((d > 0) - (d < 0));
    case kMse: return d;
    default: return acc(1) - std::exp(-d);
  }
}

at::Tensor token_kl_fwd_cpu(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t kind) {
  check_pair(logp, ref_logp, kind, "token_kl_fwd");
  at::Tensor out = at::empty_like(logp);
  const int64_t n = logp.numel();
  RLHF_DISPATCH_FLOATING(logp.scalar_type(), "token_kl_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* lp = logp.const_data_ptr<scalar_t>();
    const scalar_t* rf = ref_logp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o[i] = static_cast<scalar_t>(kl_value<acc>(lp[i], rf[i], kind));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_kl_bwd_cpu(const at::Tensor& grad, const at::Tensor& logp,
                                                    const at::Tensor& ref_logp, int64_t kind) {
  check_pair(logp, ref_logp, kind, "token_kl_bwd");
  TORCH_CHECK(grad.sizes() == logp.sizes() && grad.scalar_type() == logp.scalar_type() &&
                  grad.is_contiguous(),
              "token_kl_bwd: grad must be a contiguous ", logp.scalar_type(), " tensor of shape ",
              logp.sizes(), ", got ", grad.scalar_type(), " ", grad.sizes());
  at::Tensor g_lp = at::empty_like(logp);
  at::Tensor g_ref = at::empty_like(logp);
  const int64_t n = logp.numel();
  RLHF_DISPATCH_FLOATING(logp.scalar_type(), "token_kl_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* lp = logp.const_data_ptr<scalar_t>();
    const scalar_t* rf = ref_logp.const_data_ptr<scalar_t>();
    scalar_t* glp = g_lp.mutable_data_ptr<scalar_t>();
    scalar_t* grf = g_ref.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc v = static_cast<acc>(g[i]) * kl_slope<acc>(lp[i], rf[i], kind);
        glp[i] = static_cast<scalar_t>(v);
        grf[i] = static_cast<scalar_t>(-v);
      }
    });
  });
  return {g_lp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("token_kl_fwd", &token_kl_fwd_cpu);
  m.impl("token_kl_bwd", &token_kl_bwd_cpu);
}

}  // namespace rlhf_engine::cpu
