// KL kernels: the per-token estimators (elementwise) and the exact KL over the vocabulary
// fused over two logit tensors (one block per row). Semantics: csrc/ops.cpp.
#pragma once

#include "cuda/row_ops.cuh"

namespace rlhf_engine::kernels {

// ---- per-token estimators -------------------------------------------------------------
enum TokenKlKind : int { kKlK1 = 0, kKlAbs = 1, kKlMse = 2, kKlK3 = 3 };
constexpr int kTokenKlThreads = 256;

template <class T> struct TokenKlParams {
  const T* grad;       // [n]; backward only
  const T* logp;       // [n]
  const T* ref_logp;   // [n]
  T* out;              // forward: kl [n]; backward: grad_logp [n]
  T* grad_ref;         // backward: grad_ref_logp [n]
  int64_t n;
  int kind;
};

// d = logp - ref:  k1 = d,  abs = |d|,  mse = d^2 / 2,  k3 = e^(-d) + d - 1.
template <class A> DEV_INLINE A token_kl_value(A logp, A ref, int kind) {
  const A d = logp - ref;
  switch (kind) {
    case kKlK1: return d;
    case kKlAbs: return dev::fabs(d);
    case kKlMse: return A(0.5) * d * d;
    default: return dev::exp(-d) + d - A(1);
  }
}

// d kl / d logp (d kl / d ref is its negative for every kind):
// k1: 1,  abs: sign(d) (0 at d = 0),  mse: d,  k3: 1 - e^(-d).
template <class A> DEV_INLINE A token_kl_dlogp(A logp, A ref, int kind) {
  const A d = logp - ref;
  switch (kind) {
    case kKlK1: return A(1);
    case kKlAbs: return d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
    case kKlMse: return d;
    default: return A(1) - dev::exp(-d);
  }
}

template <class T> DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kTokenKlThreads, 1) token_kl_fwd_kernel(TokenKlParams<T> p) {
  const int64_t stride = static_cast<int64_t>(dev::grid_dim()) * dev::block_dim();
  for (int64_t i = static_cast<int64_t>(dev::block_idx()) * dev::block_dim() + dev::thread_idx(); i < p.n; i += stride) {
    const auto v = token_kl_value(dev::to_acc(dev::load_nc(p.logp + i)), dev::to_acc(dev::load_nc(p.ref_logp + i)), p.kind);
    dev::store(p.out + i, dev::from_acc<T>(v));
  }
}

template <class T> DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kTokenKlThreads, 1) token_kl_bwd_kernel(TokenKlParams<T> p) {
  const int64_t stride = static_cast<int64_t>(dev::grid_dim()) * dev::block_dim();
  for (int64_t i = static_cast<int64_t>(dev::block_idx()) * dev::block_dim() + dev::thread_idx(); i < p.n; i += stride) {
    const auto g = dev::to_acc(dev::load_nc(p.grad + i));
    const auto dl = g * token_kl_dlogp(dev::to_acc(dev::load_nc(p.logp + i)), dev::to_acc(dev::load_nc(p.ref_logp + i)), p.kind);
    dev::store(p.out + i, dev::from_acc<T>(dl));
    dev::store(p.grad_ref + i, dev::from_acc<T>(-dl));
  }
}

// ---- exact KL over the vocabulary ------------------------------------------------------
constexpr int kFullKlMaxThreads = 512;
constexpr int kFullKlUnroll = 2;  // two tensors: 2 x 2 loads in flight

template <class T> struct FullKlFwdParams {
  using A = dev::acc_t<T>;
  const T* logits;      // [N, V]
  const T* ref_logits;  // [N, V]
  int64_t row_stride;
  int64_t ref_row_stride;
  A* kl;                // [N]
  A* lse;               // [N] logsumexp(logits * inv_T)
  A* ref_lse;           // [N] logsumexp(ref_logits * inv_T)
  int64_t vocab;
  A inv_temperature;
};

template <class A> struct KlState {
  OnlineExp<A> p;  // t accumulates 2^(y - m) * (y - y_ref)
  A ref_m;
  A ref_s;
};

template <class A> DEV_INLINE KlState<A> kl_state_init() { return {online_exp_init<A>(), dev::lowest<A>(), A(0)}; }

template <class A> DEV_INLINE KlState<A> kl_state_combine(const KlState<A>& a, const KlState<A>& b) {
  const A m = dev::max(a.ref_m, b.ref_m);
  return {online_exp_combine(a.p, b.p), m, a.ref_s * dev::exp2(a.ref_m - m) + b.ref_s * dev::exp2(b.ref_m - m)};
}

template <int K, class A> DEV_INLINE void kl_state_absorb(KlState<A>& st, const A* y, const A* y_ref) {
  A w[K];
#pragma unroll
  for (int i = 0; i < K; ++i) w[i] = dev::max(y[i], dev::lowest<A>()) - dev::max(y_ref[i], dev::lowest<A>());
  online_exp_absorb<true, K>(st.p, y, w);
  OnlineExp<A> ref{st.ref_m, st.ref_s, A(0)};
  online_exp_absorb<false, K>(ref, y_ref, y_ref);
  st.ref_m = ref.m;
  st.ref_s = ref.s;
}

// kl = E_p[z - z_ref] - lse + ref_lse, with E_p[z - z_ref] = ln 2 * t / s in base 2.
template <class T>
DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kFullKlMaxThreads, kRowMinBlocks<T>) full_kl_fwd_kernel(FullKlFwdParams<T> p) {
  using A = dev::acc_t<T>;
  constexpr int N = dev::Vec<T>::N;
  const int64_t row = dev::block_idx();
  const T* DEV_RESTRICT x = p.logits + row * p.row_stride;
  const T* DEV_RESTRICT xr = p.ref_logits + row * p.ref_row_stride;
  const int64_t V = p.vocab;
  const int64_t head = dev::misaligned_head(x, V);
  const int64_t vec_head = head == dev::misaligned_head(xr, V) ? head : V;
  const A scale2 = p.inv_temperature * dev::Const<A>::kLog2e;
  struct Pair {
    dev::Vec<T> a;
    dev::Vec<T> b;
  };
  KlState<A> st = kl_state_init<A>();
  for_row<kFullKlUnroll, N>(
      V, vec_head,
      [&](int64_t j) {
        const A y[1] = {dev::to_acc(dev::load_nc(x + j)) * scale2};
        const A yr[1] = {dev::to_acc(dev::load_nc(xr + j)) * scale2};
        kl_state_absorb<1>(st, y, yr);
      },
      [&](int64_t j) { return Pair{dev::load_vec_nc(x + j), dev::load_vec_nc(xr + j)}; },
      [&](int64_t, const Pair& v) {
        A y[N], yr[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          y[i] = dev::to_acc(v.a.v[i]) * scale2;
          yr[i] = dev::to_acc(v.b.v[i]) * scale2;
        }
        kl_state_absorb<N>(st, y, yr);
      });
  st = block_reduce(st, kl_state_init<A>(), [](const KlState<A>& a, const KlState<A>& b) {
    return kl_state_combine(a, b);
  });
  if (dev::thread_idx() == 0) {
    const A ln2 = dev::Const<A>::kLn2;
    const A lse = (st.p.m + dev::log2(st.p.s)) * ln2;
    const A ref_lse = (st.ref_m + dev::log2(st.ref_s)) * ln2;
    dev::store(p.kl + row, st.p.t / st.p.s * ln2 - lse + ref_lse);
    dev::store(p.lse + row, lse);
    dev::store(p.ref_lse + row, ref_lse);
  }
}

template <class T> struct FullKlBwdParams {
  using A = dev::acc_t<T>;
  const A* grad;        // [N]
  const T* logits;      // [N, V]
  const T* ref_logits;  // [N, V]
  int64_t row_stride;
  int64_t ref_row_stride;
  const A* kl;          // [N] from the forward
  const A* lse;         // [N]
  const A* ref_lse;     // [N]
  T* grad_logits;       // [N, V] contiguous
  T* grad_ref_logits;   // [N, V] contiguous; written only when kRefGrad
  int64_t vocab;
  A inv_temperature;
};

// grad_logits[j] = g inv_T p_j (log p_j - log q_j - kl);  grad_ref_logits[j] = g inv_T (q_j - p_j).
template <class T, bool kRefGrad>
DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kFullKlMaxThreads, kRowMinBlocks<T>) full_kl_bwd_kernel(FullKlBwdParams<T> p) {
  using A = dev::acc_t<T>;
  constexpr int N = dev::Vec<T>::N;
  const int64_t row = dev::block_idx();
  const T* DEV_RESTRICT x = p.logits + row * p.row_stride;
  const T* DEV_RESTRICT xr = p.ref_logits + row * p.ref_row_stride;
  T* out = p.grad_logits + row * p.vocab;
  T* out_ref = kRefGrad ? p.grad_ref_logits + row * p.vocab : nullptr;
  const int64_t V = p.vocab;
  const int64_t head = dev::misaligned_head(x, V);
  const bool same_phase = head == dev::misaligned_head(xr, V) && head == dev::misaligned_head(out, V) &&
                          (!kRefGrad || head == dev::misaligned_head(out_ref, V));
  const int64_t vec_head = same_phase ? head : V;
  const A inv_t = p.inv_temperature;
  const A scale2 = inv_t * dev::Const<A>::kLog2e;
  const A lse = dev::load_nc(p.lse + row);
  const A ref_lse = dev::load_nc(p.ref_lse + row);
  const A lse2 = lse * dev::Const<A>::kLog2e;
  const A ref_lse2 = ref_lse * dev::Const<A>::kLog2e;
  const A g = dev::load_nc(p.grad + row) * inv_t;
  const A shift = ref_lse - lse - dev::load_nc(p.kl + row);  // log p - log q - kl = z - z_ref + shift
  struct Grads {
    A logits;
    A ref;
  };
  auto grads = [&](A xj, A xrj) {
    const A prob = dev::exp2(xj * scale2 - lse2);
    const A q = dev::exp2(xrj * scale2 - ref_lse2);
    const A diff = dev::max(xj * inv_t, dev::lowest<A>()) - dev::max(xrj * inv_t, dev::lowest<A>());
    return Grads{g * prob * (diff + shift), g * (q - prob)};
  };
  struct Pair {
    dev::Vec<T> a;
    dev::Vec<T> b;
  };
  for_row<kFullKlUnroll, N>(
      V, vec_head,
      [&](int64_t j) {
        const Grads gr = grads(dev::to_acc(dev::load_nc(x + j)), dev::to_acc(dev::load_nc(xr + j)));
        dev::store(out + j, dev::from_acc<T>(gr.logits));
        if (kRefGrad) dev::store(out_ref + j, dev::from_acc<T>(gr.ref));
      },
      [&](int64_t j) { return Pair{dev::load_vec_nc(x + j), dev::load_vec_nc(xr + j)}; },
      [&](int64_t j, const Pair& v) {
        dev::Vec<T> o, o_ref;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const Grads gr = grads(dev::to_acc(v.a.v[i]), dev::to_acc(v.b.v[i]));
          o.v[i] = dev::from_acc<T>(gr.logits);
          o_ref.v[i] = dev::from_acc<T>(gr.ref);
        }
        dev::store_vec(out + j, o);
        if (kRefGrad) dev::store_vec(out_ref + j, o_ref);
      });
}

}  // namespace rlhf_engine::kernels
