// Fused log-softmax + gather (+ entropy) over rows of logits [N, V], and its backward.
// Semantics: csrc/ops.cpp (schemas logprobs_fwd / logprobs_bwd / logprobs_bwd_inplace).
#include "cpu/vec_common.h"

#include <torch/library.h>

namespace rlhf_engine::cpu {
namespace {

// Elements per block of the online reduction (the unit of rescaling and of a rare redo).
constexpr int64_t kBlock = 2048;
// A block whose max exceeds the reference max by more than this (in log2 units) is summed again
// at its own max: its exponentials may have reached 2^127. Below it they stay finite in fp32.
constexpr double kRedoLog2 = 60.0;

template <typename scalar_t>
struct RowStats {
  acc_t<scalar_t> max_x;  // max of the row's x (not scaled)
  acc_t<scalar_t> log_s;  // log sum exp((x - max_x) inv_t); lse = max_x inv_t + log_s
  acc_t<scalar_t> entropy;
};

template <typename acc>
struct BlockSums {
  acc s, t, max_x;
};

// Sums over one block against a reference max m: y = (x - m) c with c = inv_t log2(e),
// s = sum 2^y, t = sum 2^y y (entropy only), and the block's max of x, in one read.
template <typename scalar_t, bool kEntropy>
BlockSums<acc_t<scalar_t>> block_sums(const scalar_t* xb, int64_t len, acc_t<scalar_t> m, acc_t<scalar_t> c) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t W = step<scalar_t>();
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const int64_t vec_len = len - len % W;
  const Vec vm(m), vc(c), vlo(std::is_same_v<acc, float> ? acc(-126) : acc(-1022));
  Vec vmax0(neg_inf), vmax1(neg_inf), vs0(0), vs1(0), vt0(0), vt1(0);
  for (int64_t i = 0; i < vec_len; i += W) {
    Vec a, b;
    load2(xb + i, a, b);
    vmax0 = at::vec::maximum(vmax0, a);
    vmax1 = at::vec::maximum(vmax1, b);
    const Vec ya = (a - vm) * vc;
    const Vec yb = (b - vm) * vc;
    const Vec ea = exp2_clamped(ya);
    const Vec eb = exp2_clamped(yb);
    vs0 += ea;
    vs1 += eb;
    if constexpr (kEntropy) {  // clamp y as exp2 does, so that -inf logits add 2^-126 * -126, not NaN
      vt0 = at::vec::fmadd(ea, at::vec::maximum(ya, vlo), vt0);
      vt1 = at::vec::fmadd(eb, at::vec::maximum(yb, vlo), vt1);
    }
  }
  BlockSums<acc> r{reduce_sum(vs0 + vs1), kEntropy ? reduce_sum(vt0 + vt1) : acc(0),
                   reduce_max(at::vec::maximum(vmax0, vmax1))};
  for (int64_t i = vec_len; i < len; ++i) {
    const acc xi = static_cast<acc>(xb[i]);
    r.max_x = std::max(r.max_x, xi);
    const acc y = std::max((xi - m) * c, std::is_same_v<acc, float> ? acc(-126) : acc(-1022));
    const acc e = exp2_clamped(y);
    r.s += e;
    if constexpr (kEntropy) r.t += e * y;
  }
  return r;
}

template <typename scalar_t>
acc_t<scalar_t> block_max(const scalar_t* xb, int64_t len) {
  using acc = acc_t<scalar_t>;
  acc mx = -std::numeric_limits<acc>::infinity();
  for (int64_t i = 0; i < len; ++i) mx = std::max(mx, static_cast<acc>(xb[i]));
  return mx;
}

// One row: lse = logsumexp(z), entropy = lse - sum softmax(z) z, z = x inv_t (inv_t > 0).
// Online over blocks in ONE read of the row (one exp per element): each block is summed against
// the running max m of x (s = sum 2^y, t = sum 2^y y, y = (x - m) inv_t log2 e); when the block
// raises the max, (s, t) are rescaled once:  y' = y + d, d = (m - m') c:
//   s' = 2^d s,  t' = 2^d (t + d s).
// Only the first block of a row is read twice (its max seeds m), and a block whose max jumps by
// more than kRedoLog2 is summed again (its exponentials could have overflowed).
// Shifting in x-space before scaling keeps z_label - lse exact to the rounding of x_label - m.
template <typename scalar_t, bool kEntropy>
RowStats<scalar_t> row_stats(const scalar_t* x, int64_t V, acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const acc c = inv_t * static_cast<acc>(kLog2e);
  acc m = neg_inf, s = 0, t = 0;
  auto rescale = [&](acc new_m) {
    const acc d = (m - new_m) * c;
    const acc sc = exp2_clamped(d);
    t = sc * (t + d * s);
    s = sc * s;
    m = new_m;
  };
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const scalar_t* xb = x + b0;
    const int64_t len = std::min(kBlock, V - b0);
    if (m == neg_inf) {
      m = block_max(xb, len);
      if (m == neg_inf) continue;  // every element so far is -inf
    }
    BlockSums<acc> bs = block_sums<scalar_t, kEntropy>(xb, len, m, c);
    if (bs.max_x > m && (bs.max_x - m) * c > static_cast<acc>(kRedoLog2)) {
      rescale(bs.max_x);
      bs = block_sums<scalar_t, kEntropy>(xb, len, m, c);
      s += bs.s;
      t += bs.t;
    } else {
      s += bs.s;
      t += bs.t;
      if (bs.max_x > m) rescale(bs.max_x);
    }
  }
  // All -inf row: lse = -inf (as torch.logsumexp); softmax is undefined, entropy NaN.
  if (m == neg_inf) return {neg_inf, acc(0), std::numeric_limits<acc>::quiet_NaN()};
  const acc log_s = std::log(s);
  return {m, log_s, kEntropy ? log_s - static_cast<acc>(kLn2) * t / s : acc(0)};
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "logprobs: logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "logprobs: logits must be contiguous");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "logprobs: logits must be a floating tensor, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "logprobs: labels must be [N] = [", logits.size(0), "], got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "logprobs: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous(), "logprobs: labels must be contiguous");
  TORCH_CHECK(logits.size(1) >= 1, "logprobs: logits must have V >= 1 columns");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t l = lab[n];
    TORCH_CHECK_INDEX(l == ignore_index || (l >= 0 && l < V), "logprobs: labels[", n, "] = ", l,
                      " is out of range for V = ", V, " (and is not ignore_index = ", ignore_index,
                      ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits,
                                                                 const at::Tensor& labels,
                                                                 double inv_temperature,
                                                                 int64_t ignore_index,
                                                                 bool with_entropy) {
  check_rows(logits, labels, ignore_index);
  TORCH_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature),
              "logprobs: inv_temperature must be finite and > 0, got ", inv_temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor logprob = at::empty({N}, opts);
  at::Tensor entropy = at::zeros({N}, opts);
  at::Tensor lse = at::empty({N}, opts);
  RLHF_DISPATCH_FLOATING(logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    acc* lp = logprob.mutable_data_ptr<acc>();
    acc* ent = entropy.mutable_data_ptr<acc>();
    acc* ls = lse.mutable_data_ptr<acc>();
    const acc inv_t = static_cast<acc>(inv_temperature);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (lab[n] == ignore_index) {
          lp[n] = 0;
          ls[n] = 0;
          continue;  // entropy stays 0
        }
        const scalar_t* row = x + n * V;
        const RowStats<scalar_t> st = with_entropy ? row_stats<scalar_t, true>(row, V, inv_t)
                                                   : row_stats<scalar_t, false>(row, V, inv_t);
        ls[n] = st.max_x * inv_t + st.log_s;
        lp[n] = (static_cast<acc>(row[lab[n]]) - st.max_x) * inv_t - st.log_s;
        if (with_entropy) ent[n] = st.entropy;
      }
    });
  });
  return {logprob, entropy, lse};
}

// grad[n, j] = inv_t * (g_lp (onehot_j - p_j) - g_ent p_j (z_j - lse + H))
//            = p_j * (c0 + c1 * (z_j - lse)) off the label,
// with c0 = -inv_t (g_lp + g_ent H), c1 = -inv_t g_ent; the label column adds inv_t g_lp.
// `grad` may alias `logits` (in-place backward): each element is read before it is written.
template <typename scalar_t>
void logprobs_bwd_kernel(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                         const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                         const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                         at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t W = step<scalar_t>();
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool has_ent = grad_entropy.defined() && grad_entropy.numel() > 0;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* gx = grad.mutable_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const acc* glp = grad_logprob.const_data_ptr<acc>();
  const acc* gent = has_ent ? grad_entropy.const_data_ptr<acc>() : nullptr;
  const acc* ls = lse.const_data_ptr<acc>();
  const acc* ent = entropy.const_data_ptr<acc>();
  const acc inv_t = static_cast<acc>(inv_temperature);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = x + n * V;
      scalar_t* grow = gx + n * V;
      if (lab[n] == ignore_index) {
        std::fill(grow, grow + V, scalar_t(0));
        continue;
      }
      const acc g_lp = glp[n];
      const acc g_ent = has_ent ? gent[n] : acc(0);
      const acc H = has_ent ? ent[n] : acc(0);
      const acc lse_n = ls[n];
      const acc c0 = -inv_t * (g_lp + g_ent * H);
      const acc c1 = -inv_t * g_ent;
      // The label column, computed from the input before the loop overwrites it.
      const acc lz_l = static_cast<acc>(row[lab[n]]) * inv_t - lse_n;
      const acc p_l = std::exp(lz_l);
      const acc g_label = inv_t * (g_lp * (acc(1) - p_l) - g_ent * p_l * (lz_l + H));
      // y = (z - lse) log2 e, clamped as exp2 clamps it; p = 2^y; grad = p (c0 + c1 ln2 y)
      const acc l2e = static_cast<acc>(kLog2e);
      const acc lo = std::is_same_v<acc, float> ? acc(-126) : acc(-1022);
      const Vec vk(inv_t * l2e), vb(-lse_n * l2e), vlo(lo), vc0(c0), vc1(c1 * static_cast<acc>(kLn2));
      const int64_t vec_len = V - V % W;
      for (int64_t i = 0; i < vec_len; i += W) {
        Vec a, c;
        load2(row + i, a, c);
        const Vec ya = at::vec::maximum(at::vec::fmadd(a, vk, vb), vlo);
        const Vec yc = at::vec::maximum(at::vec::fmadd(c, vk, vb), vlo);
        const Vec ga = exp2_clamped(ya) * at::vec::fmadd(vc1, ya, vc0);
        const Vec gc = exp2_clamped(yc) * at::vec::fmadd(vc1, yc, vc0);
        store2(grow + i, ga, gc);
      }
      for (int64_t i = vec_len; i < V; ++i) {
        const acc y = std::max(static_cast<acc>(row[i]) * inv_t * l2e - lse_n * l2e, lo);
        grow[i] = static_cast<scalar_t>(exp2_clamped(y) * (c0 + c1 * static_cast<acc>(kLn2) * y));
      }
      grow[lab[n]] = static_cast<scalar_t>(g_label);
    }
  });
}

void check_bwd(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
               const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
               const at::Tensor& entropy, int64_t ignore_index) {
  check_rows(logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check_vec = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "logprobs_bwd: ", name, " must be [N] = [", N,
                "], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == acc_dtype, "logprobs_bwd: ", name, " must be ", acc_dtype,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "logprobs_bwd: ", name, " must be contiguous");
  };
  check_vec(grad_logprob, "grad_logprob");
  check_vec(lse, "lse");
  check_vec(entropy, "entropy");
  if (grad_entropy.defined() && grad_entropy.numel() > 0) check_vec(grad_entropy, "grad_entropy");
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  check_bwd(grad_logprob, grad_entropy, logits, labels, lse, entropy, ignore_index);
  at::Tensor grad = empty_like_for_write(logits);
  RLHF_DISPATCH_FLOATING(logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    logprobs_bwd_kernel<scalar_t>(grad_logprob, grad_entropy, logits, labels, lse, entropy,
                                  inv_temperature, ignore_index, grad);
  });
  return grad;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                              at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  check_bwd(grad_logprob, grad_entropy, logits, labels, lse, entropy, ignore_index);
  RLHF_DISPATCH_FLOATING(logits.scalar_type(), "logprobs_bwd_inplace_cpu", [&] {
    logprobs_bwd_kernel<scalar_t>(grad_logprob, grad_entropy, logits, labels, lse, entropy,
                                  inv_temperature, ignore_index, logits);
  });
}

}  // namespace

// Width of the float vectors the CPU kernels were compiled with (ops.cpp: cpu_vector_bits).
int64_t compiled_vector_bits() { return vector_bits(); }

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_inplace", &logprobs_bwd_inplace_cpu);
}

}  // namespace rlhf_engine::cpu
