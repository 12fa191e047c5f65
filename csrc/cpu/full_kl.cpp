// Exact KL(pi || pi_ref) over the vocabulary from two logit tensors [N, V], fused, and its
// backward. Semantics: csrc/ops.cpp (full_kl_fwd / full_kl_bwd). No [N, V] temporaries.
#include "cpu/vec_common.h"

#include <torch/library.h>

namespace rlhf_engine::cpu {
namespace {

constexpr int64_t kBlock = 2048;

template <typename acc>
struct KlStats {
  acc kl, lse_p, lse_q;
};

// One row, online over blocks (see logprobs.cpp): zp = x inv_t, zq = y inv_t,
// s_p = sum e^{zp - m_p}, s_q = sum e^{zq - m_q}, t = sum e^{zp - m_p} (zp - zq);
// kl = t / s_p - lse_p + lse_q.
template <typename scalar_t>
KlStats<acc_t<scalar_t>> row_kl(const scalar_t* x, const scalar_t* y, int64_t V, acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t W = step<scalar_t>();
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  acc mp = neg_inf, mq = neg_inf, sp = 0, sq = 0, t = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const scalar_t* xb = x + b0;
    const scalar_t* yb = y + b0;
    const int64_t len = std::min(kBlock, V - b0);
    const int64_t vec_len = len - len % W;
    // 1. block maxima
    Vec vxm(neg_inf), vym(neg_inf);
    for (int64_t i = 0; i < vec_len; i += W) {
      Vec a, b, c, d;
      load2(xb + i, a, b);
      load2(yb + i, c, d);
      vxm = at::vec::maximum(vxm, at::vec::maximum(a, b));
      vym = at::vec::maximum(vym, at::vec::maximum(c, d));
    }
    acc bx = reduce_max(vxm), by = reduce_max(vym);
    for (int64_t i = vec_len; i < len; ++i) {
      bx = std::max(bx, static_cast<acc>(xb[i]));
      by = std::max(by, static_cast<acc>(yb[i]));
    }
    const acc new_mp = std::max(mp, bx * inv_t);
    const acc new_mq = std::max(mq, by * inv_t);
    // 2. rescale running sums to the new maxima
    if (mp != neg_inf) {
      const acc sc = std::exp(mp - new_mp);
      sp *= sc;
      t *= sc;
    }
    if (mq != neg_inf) sq *= std::exp(mq - new_mq);
    mp = new_mp;
    mq = new_mq;
    // 3. block sums
    const Vec vinv(inv_t), vneg_mp(-mp), vneg_mq(-mq);
    Vec vsp(0), vsq(0), vt(0);
    for (int64_t i = 0; i < vec_len; i += W) {
      Vec a, b, c, d;
      load2(xb + i, a, b);
      load2(yb + i, c, d);
      const Vec za = a * vinv, zb = b * vinv, zc = c * vinv, zd = d * vinv;
      const Vec ea = fast_exp(za + vneg_mp), eb = fast_exp(zb + vneg_mp);
      vsp += ea + eb;
      vsq += fast_exp(zc + vneg_mq) + fast_exp(zd + vneg_mq);
      vt = at::vec::fmadd(ea, za - zc, vt);
      vt = at::vec::fmadd(eb, zb - zd, vt);
    }
    sp += reduce_sum(vsp);
    sq += reduce_sum(vsq);
    t += reduce_sum(vt);
    for (int64_t i = vec_len; i < len; ++i) {
      const acc zp = static_cast<acc>(xb[i]) * inv_t, zq = static_cast<acc>(yb[i]) * inv_t;
      const acc e = std::exp(zp - mp);
      sp += e;
      sq += std::exp(zq - mq);
      t += e * (zp - zq);
    }
  }
  const acc lse_p = mp + std::log(sp), lse_q = mq + std::log(sq);
  return {t / sp - lse_p + lse_q, lse_p, lse_q};
}

void check_logit_pair(const at::Tensor& logits, const at::Tensor& ref_logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating, got ",
              logits.scalar_type());
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), op, ": ref_logits shape ", ref_logits.sizes(),
              " must equal logits shape ", logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), op, ": ref_logits dtype ",
              ref_logits.scalar_type(), " must equal logits dtype ", logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous() && ref_logits.is_contiguous(), op,
              ": logits and ref_logits must be contiguous");
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have V >= 1 columns");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_fwd_cpu(const at::Tensor& logits,
                                                                const at::Tensor& ref_logits,
                                                                double inv_temperature) {
  check_logit_pair(logits, ref_logits, "full_kl_fwd");
  TORCH_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature),
              "full_kl_fwd: inv_temperature must be finite and > 0, got ", inv_temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor kl = at::empty({N}, opts), lse = at::empty({N}, opts), ref_lse = at::empty({N}, opts);
  RLHF_DISPATCH_FLOATING(logits.scalar_type(), "full_kl_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const scalar_t* y = ref_logits.const_data_ptr<scalar_t>();
    acc* k = kl.mutable_data_ptr<acc>();
    acc* lp = lse.mutable_data_ptr<acc>();
    acc* lq = ref_lse.mutable_data_ptr<acc>();
    const acc inv_t = static_cast<acc>(inv_temperature);
    at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const KlStats<acc> st = row_kl(x + n * V, y + n * V, V, inv_t);
        k[n] = st.kl;
        lp[n] = st.lse_p;
        lq[n] = st.lse_q;
      }
    });
  });
  return {kl, lse, ref_lse};
}

// grad_x[j] = g inv_t p_j (log p_j - log q_j - kl); grad_y[j] = g inv_t (q_j - p_j).
std::tuple<at::Tensor, at::Tensor> full_kl_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                   const at::Tensor& ref_logits, const at::Tensor& kl,
                                                   const at::Tensor& lse, const at::Tensor& ref_lse,
                                                   double inv_temperature, bool ref_grad) {
  check_logit_pair(logits, ref_logits, "full_kl_bwd");
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad, "grad"},
                                {kl, "kl"}, {lse, "lse"}, {ref_lse, "ref_lse"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N && t.scalar_type() == acc_dtype && t.is_contiguous(),
                "full_kl_bwd: ", name, " must be a contiguous ", acc_dtype, " tensor [", N, "], got ",
                t.scalar_type(), " ", t.sizes());
  }
  at::Tensor gx = empty_like_for_write(logits);
  at::Tensor gy = ref_grad ? empty_like_for_write(ref_logits) : at::empty({0}, logits.options());
  RLHF_DISPATCH_FLOATING(logits.scalar_type(), "full_kl_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    using Vec = AccVec<scalar_t>;
    constexpr int64_t W = step<scalar_t>();
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const scalar_t* y = ref_logits.const_data_ptr<scalar_t>();
    scalar_t* ox = gx.mutable_data_ptr<scalar_t>();
    scalar_t* oy = ref_grad ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    const acc* g = grad.const_data_ptr<acc>();
    const acc* k = kl.const_data_ptr<acc>();
    const acc* lp = lse.const_data_ptr<acc>();
    const acc* lq = ref_lse.const_data_ptr<acc>();
    const acc inv_t = static_cast<acc>(inv_temperature);
    at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xr = x + n * V;
        const scalar_t* yr = y + n * V;
        const acc c = g[n] * inv_t;
        // log p - log q - kl = (zp - zq) + (lse_q - lse_p - kl)
        const acc shift = lq[n] - lp[n] - k[n];
        const Vec vinv(inv_t), vc(c), vshift(shift), vneg_lp(-lp[n]), vneg_lq(-lq[n]);
        const int64_t vec_len = V - V % W;
        for (int64_t i = 0; i < vec_len; i += W) {
          Vec a, b, cc, d;
          load2(xr + i, a, b);
          load2(yr + i, cc, d);
          const Vec za = a * vinv, zb = b * vinv, zc = cc * vinv, zd = d * vinv;
          const Vec pa = fast_exp(za + vneg_lp), pb = fast_exp(zb + vneg_lp);
          store2(ox + n * V + i, vc * pa * (za - zc + vshift), vc * pb * (zb - zd + vshift));
          if (ref_grad) {
            const Vec qa = fast_exp(zc + vneg_lq), qb = fast_exp(zd + vneg_lq);
            store2(oy + n * V + i, vc * (qa - pa), vc * (qb - pb));
          }
        }
        for (int64_t i = vec_len; i < V; ++i) {
          const acc zp = static_cast<acc>(xr[i]) * inv_t, zq = static_cast<acc>(yr[i]) * inv_t;
          const acc p = std::exp(zp - lp[n]);
          ox[n * V + i] = static_cast<scalar_t>(c * p * (zp - zq + shift));
          if (ref_grad) oy[n * V + i] = static_cast<scalar_t>(c * (std::exp(zq - lq[n]) - p));
        }
      }
    });
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("full_kl_fwd", &full_kl_fwd_cpu);
  m.impl("full_kl_bwd", &full_kl_bwd_cpu);
}

}  // namespace rlhf_engine::cpu
