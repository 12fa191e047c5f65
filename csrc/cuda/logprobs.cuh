// Fused log-softmax + gather (+ entropy): forward and one-pass backward, one block per row.
// Semantics: csrc/ops.cpp (logprobs_fwd / logprobs_bwd).
#pragma once

#include "cuda/row_ops.cuh"

namespace rlhf_engine::kernels {

constexpr int kLogprobsMaxThreads = 512;  // launch bound; launchers pick 128, 256 or 512
constexpr int kLogprobsUnroll = 4;        // 16-byte loads in flight per thread (forward)
constexpr int kLogprobsBwdUnroll = 2;     // backward: each load also becomes a store; fits 40 registers

template <class T> struct LogprobsFwdParams {
  using A = dev::acc_t<T>;
  const T* logits;          // [N, V], rows row_stride elements apart, unit stride within a row
  int64_t row_stride;
  const int64_t* labels;    // [N]
  A* logprob;               // [N]
  A* entropy;               // [N] (zeros unless kEntropy)
  A* lse;                   // [N] log-sum-exp of z = logits * inv_temperature (0 for ignored rows)
  int64_t vocab;
  A inv_temperature;
  int64_t ignore_index;
};

// logprob = z[label] - lse, entropy = lse - sum softmax(z) * z, in one read of the row.
// A label outside [0, V) (and not ignore_index) gives a NaN log-prob; it is never read.
template <class T, bool kEntropy>
DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kLogprobsMaxThreads, kRowMinBlocks<T>) logprobs_fwd_kernel(LogprobsFwdParams<T> p) {
  using A = dev::acc_t<T>;
  constexpr int N = dev::Vec<T>::N;
  const int64_t row = dev::block_idx();
  const int64_t label = dev::load_nc(p.labels + row);
  if (label == p.ignore_index) {  // uniform over the block: the row is never read
    if (dev::thread_idx() == 0) {
      dev::store(p.logprob + row, A(0));
      dev::store(p.entropy + row, A(0));
      dev::store(p.lse + row, A(0));
    }
    return;
  }
  const T* DEV_RESTRICT x = p.logits + row * p.row_stride;
  const int64_t V = p.vocab;
  const A scale2 = p.inv_temperature * dev::Const<A>::kLog2e;  // y = logit * scale2 = z * log2 e

  OnlineExp<A> st = online_exp_init<A>();
  auto absorb = [&](const A* y, auto k_const) {
    constexpr int K = decltype(k_const)::value;
    A w[K];
#pragma unroll
    for (int i = 0; i < K; ++i) w[i] = dev::max(y[i], dev::lowest<A>());  // -inf logits: 0 * lowest, not NaN
    online_exp_absorb<kEntropy, K>(st, y, w);
  };
  for_row<kLogprobsUnroll, N>(
      V, dev::misaligned_head(x, V),
      [&](int64_t j) {
        const A y[1] = {dev::to_acc(dev::load_nc(x + j)) * scale2};
        absorb(y, IntConst<1>{});
      },
      [&](int64_t j) { return dev::load_vec_nc(x + j); },
      [&](int64_t, const dev::Vec<T>& v) {
        A y[N];
#pragma unroll
        for (int i = 0; i < N; ++i) y[i] = dev::to_acc(v.v[i]) * scale2;
        absorb(y, IntConst<N>{});
      });

  st = block_reduce(st, online_exp_init<A>(), [](const OnlineExp<A>& a, const OnlineExp<A>& b) {
    return online_exp_combine(a, b);
  });
  if (dev::thread_idx() == 0) {
    const A lse2 = st.m + dev::log2(st.s);
    const A lse = lse2 * dev::Const<A>::kLn2;
    const bool in_range = label >= 0 && label < V;
    const A z_label = in_range ? dev::to_acc(dev::load_nc(x + (in_range ? label : 0))) * p.inv_temperature : A(0);
    dev::store(p.logprob + row, in_range ? z_label - lse : dev::quiet_nan<A>());
    dev::store(p.entropy + row, kEntropy ? (lse2 - st.t / st.s) * dev::Const<A>::kLn2 : A(0));
    dev::store(p.lse + row, lse);
  }
}

template <class T> struct LogprobsBwdParams {
  using A = dev::acc_t<T>;
  const A* grad_logprob;  // [N]
  const A* grad_entropy;  // [N]; read only when kEntropy
  const T* logits;        // [N, V]
  int64_t row_stride;
  const int64_t* labels;  // [N]
  const A* lse;           // [N] from the forward
  const A* entropy;       // [N] from the forward
  T* grad_logits;         // [N, V]; may be `logits` itself (in place): each element is read, then written, by one thread
  int64_t grad_row_stride;
  int64_t vocab;
  A inv_temperature;
  int64_t ignore_index;
};

// grad[j] = inv_T * ( g * (onehot_j - p_j) - g_ent * p_j * (z_j - lse + H) )
//         = inv_T * ( g * onehot_j - p_j * (a + g_ent * z_j) ),  a = g + g_ent * (H - lse),
// with p_j = 2^(x_j * scale2 - lse * log2 e). Ignored rows are written with zeros (not read).
template <class T, bool kEntropy>
DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kLogprobsMaxThreads, kRowMinBlocks<T>) logprobs_bwd_kernel(LogprobsBwdParams<T> p) {
  using A = dev::acc_t<T>;
  constexpr int N = dev::Vec<T>::N;
  const int64_t row = dev::block_idx();
  const int64_t label = dev::load_nc(p.labels + row);
  const T* x = p.logits + row * p.row_stride;
  T* out = p.grad_logits + row * p.grad_row_stride;
  const int64_t V = p.vocab;
  const int64_t head = dev::misaligned_head(out, V);
  // Vectors only when input and output rows share their 16-byte phase.
  const int64_t vec_head = head == dev::misaligned_head(x, V) ? head : V;

  if (label == p.ignore_index) {  // uniform over the block
    dev::Vec<T> zero;
#pragma unroll
    for (int i = 0; i < N; ++i) zero.v[i] = dev::from_acc<T>(A(0));
    for_row<1, N>(
        V, head, [&](int64_t j) { dev::store(out + j, dev::from_acc<T>(A(0))); }, [&](int64_t) { return 0; },
        [&](int64_t j, int) { dev::store_vec(out + j, zero); });
    return;
  }
  const A inv_t = p.inv_temperature;
  const A scale2 = inv_t * dev::Const<A>::kLog2e;
  const A lse = dev::load_nc(p.lse + row);
  const A lse2 = lse * dev::Const<A>::kLog2e;
  const A g = dev::load_nc(p.grad_logprob + row);
  const A g_ent = kEntropy ? dev::load_nc(p.grad_entropy + row) : A(0);
  const A a = g + g_ent * (dev::load_nc(p.entropy + row) - lse);
  auto grad = [&](A xj, int64_t j) {
    const A prob = dev::exp2(xj * scale2 - lse2);
    const A inner = kEntropy ? a + g_ent * dev::max(xj * inv_t, dev::lowest<A>()) : a;
    return inv_t * ((j == label ? g : A(0)) - prob * inner);
  };
  for_row<kLogprobsBwdUnroll, N>(
      V, vec_head,
      [&](int64_t j) { dev::store(out + j, dev::from_acc<T>(grad(dev::to_acc(x[j]), j))); },
      [&](int64_t j) { return dev::load_vec(x + j); },
      [&](int64_t j, const dev::Vec<T>& v) {
        dev::Vec<T> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = dev::from_acc<T>(grad(dev::to_acc(v.v[i]), j + i));
        dev::store_vec(out + j, o);
      });
}

}  // namespace rlhf_engine::kernels
