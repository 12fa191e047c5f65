// Building blocks shared by the one-block-per-row kernels (logprobs, full KL): the row walk
// with 16-byte vectors, the online (max, sum-exp) state, and the block reduction.
#pragma once

#include "cuda/primitives.cuh"

namespace rlhf_engine::kernels {

// Blocks of the row kernels' largest size (512) that must fit on one SM: caps registers at
// 65536 / (512 * 3) -> 40 per thread (75% occupancy); fp64 rows need more and get 1.
template <class T> constexpr int kRowMinBlocks = sizeof(T) == 8 ? 1 : 3;

template <int K> struct IntConst {
  static constexpr int value = K;
};

// Visits the elements [0, V) of a row whose first 16-byte boundary is `head` elements in:
// scalar(j) for j < head and for the tail past the last whole vector; between them,
// use(j, load(j)) for every vector start j, with U vector loads issued before their use.
// head == V sends every element down the scalar path (rows whose buffers disagree in alignment).
template <int U, int N, class Scalar, class Load, class Use>
DEV_INLINE void for_row(int64_t V, int64_t head, Scalar scalar, Load load, Use use) {
  const int tid = dev::thread_idx();
  const int nt = dev::block_dim();
  const int64_t nvec = (V - head) / N;
  for (int64_t j = tid; j < head; j += nt) scalar(j);
  int64_t i = tid;
  for (; i + static_cast<int64_t>(U - 1) * nt < nvec; i += static_cast<int64_t>(U) * nt) {
    decltype(load(int64_t{0})) v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) v[k] = load(head + (i + static_cast<int64_t>(k) * nt) * N);
#pragma unroll
    for (int k = 0; k < U; ++k) use(head + (i + static_cast<int64_t>(k) * nt) * N, v[k]);
  }
  for (; i < nvec; i += nt) use(head + i * N, load(head + i * N));
  for (int64_t j = head + nvec * N + tid; j < V; j += nt) scalar(j);
}

// Online softmax statistics in base 2 (y = z * log2 e): m = max y, s = sum 2^(y - m),
// t = sum 2^(y - m) * w for a per-element weight w (y itself for the entropy; y - y_ref for KL).
template <class A> struct OnlineExp {
  A m;
  A s;
  A t;
};

template <class A> DEV_INLINE OnlineExp<A> online_exp_init() { return {dev::lowest<A>(), A(0), A(0)}; }

template <class A> DEV_INLINE OnlineExp<A> online_exp_combine(const OnlineExp<A>& a, const OnlineExp<A>& b) {
  const A m = dev::max(a.m, b.m);
  const A ra = dev::exp2(a.m - m);
  const A rb = dev::exp2(b.m - m);
  return {m, a.s * ra + b.s * rb, a.t * ra + b.t * rb};
}

// Absorbs K elements y[] (weights w[] when kWeighted) with one rescale for all K.
template <bool kWeighted, int K, class A> DEV_INLINE void online_exp_absorb(OnlineExp<A>& st, const A* y, const A* w) {
  A m = st.m;
#pragma unroll
  for (int i = 0; i < K; ++i) m = dev::max(m, y[i]);
  const A r = dev::exp2(st.m - m);
  st.s *= r;
  if (kWeighted) st.t *= r;
  st.m = m;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const A e = dev::exp2(y[i] - m);
    st.s += e;
    if (kWeighted) st.t += e * w[i];
  }
}

// Reduces x over the block with an associative combine; the result is valid in thread 0.
// Uses one static shared array per (S, Combine): call it once per kernel.
template <class S, class Combine> DEV_INLINE S block_reduce(S x, S identity, Combine combine) {
  DEV_SHARED(S, partial, [32]);
  x = dev::warp_allreduce(x, combine);
  if (dev::lane_idx() == 0) partial[dev::warp_idx()] = x;
  dev::sync_block();
  if (dev::warp_idx() == 0) {
    x = dev::lane_idx() < dev::num_warps() ? partial[dev::lane_idx()] : identity;
    x = dev::warp_allreduce(x, combine);
  }
  return x;
}

}  // namespace rlhf_engine::kernels
