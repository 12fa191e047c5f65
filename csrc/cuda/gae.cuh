// Generalized advantage estimation as a chunked parallel scan over T, one block per sequence.
// Semantics: csrc/ops.cpp (gae / gae_packed).
//
// Walking right to left, the state is (A, Vn): the advantage and the value at the next valid
// position (both 0 past the last valid one). A valid position t maps it affinely,
//   A' = c A + gamma Vn + (r_t - V_t),  Vn' = V_t          (c = gamma lam)
// and a masked position maps it to itself. Maps compose, so a tile of kThreads * kItems
// positions is scanned in parallel: each thread composes the maps of its kItems positions,
// a suffix scan over threads (warp shuffles, then one shared slot per warp) gives each thread
// the state entering its chunk, and each thread replays its chunk. Tiles run right to left,
// carrying the state.
#pragma once

#include "cuda/primitives.cuh"

namespace rlhf_engine::kernels {

template <class T> struct GaeParams {
  using A = dev::acc_t<T>;
  const T* rewards;         // [B, T] or packed [L]
  const T* values;          // same layout
  const uint8_t* mask;      // [B, T] bools, or nullptr (every position valid: the packed form)
  const int64_t* offsets;   // packed form: [B + 1]; nullptr for [B, T]
  T* advantages;            // same layout; masked positions 0
  T* returns;               // same layout; masked positions 0
  int64_t seq_len;          // T for [B, T]; total length L for the packed form (bounds offsets)
  A gamma;
  A lam;
};

// A' = a A + b Vn + k;  Vn' = valid ? v_first : Vn   (valid, v_first: of the leftmost valid position)
template <class A> struct GaeMap {
  A a;
  A b;
  A k;
  A v_first;
  A valid;  // 0 or 1 (a float so that the map is whole words of one type for shuffles)
};

template <class A> DEV_INLINE GaeMap<A> gae_identity() { return {A(1), A(0), A(0), A(0), A(0)}; }

// left o right: apply `right` first (it covers later positions), then `left`.
template <class A> DEV_INLINE GaeMap<A> gae_compose(const GaeMap<A>& left, const GaeMap<A>& right) {
  const bool rv = right.valid != A(0);
  GaeMap<A> out;
  out.a = left.a * right.a;
  out.b = left.a * right.b + (rv ? A(0) : left.b);
  out.k = left.a * right.k + (rv ? left.b * right.v_first : A(0)) + left.k;
  out.valid = (left.valid != A(0) || rv) ? A(1) : A(0);
  out.v_first = left.valid != A(0) ? left.v_first : right.v_first;
  return out;
}

template <class A> DEV_INLINE void gae_apply(const GaeMap<A>& m, A& adv, A& v_next) {
  adv = m.a * adv + m.b * v_next + m.k;
  v_next = m.valid != A(0) ? m.v_first : v_next;
}

// Production shape: 256 threads x 4 positions = tiles of 1024.
struct GaeDefaultConfig {
  static constexpr int kThreads = 256;
  static constexpr int kItems = 4;
};

// Blocks per SM the register budget must allow: 8 x 256 threads (32 registers) for fp32.
template <class T> constexpr int kGaeMinBlocks = sizeof(T) == 8 ? 4 : 8;

template <class T, int kThreads, int kItems>
DEV_GLOBAL void DEV_LAUNCH_BOUNDS(kThreads, kGaeMinBlocks<T>) gae_kernel(GaeParams<T> p) {
  using A = dev::acc_t<T>;
  constexpr int kTile = kThreads * kItems;
  constexpr int kWarps = kThreads / dev::kWarpSize;
  static_assert(kThreads % dev::kWarpSize == 0, "whole warps");
  DEV_SHARED(A, s_r, [kTile]);  // rewards, then advantages
  DEV_SHARED(A, s_v, [kTile]);  // values, then returns
  DEV_SHARED(uint8_t, s_m, [kTile]);
  DEV_SHARED(GaeMap<A>, s_warp, [kWarps]);
  const int tid = dev::thread_idx();
  const int lane = dev::lane_idx();
  const int warp = dev::warp_idx();

  const int64_t seq = dev::block_idx();
  int64_t start = seq * p.seq_len;
  int64_t len = p.seq_len;
  if (p.offsets != nullptr) {  // packed: clamp to [0, L] so that bad offsets never read out of bounds
    const int64_t lo = dev::min(dev::max(dev::load_nc(p.offsets + seq), int64_t{0}), p.seq_len);
    const int64_t hi = dev::min(dev::max(dev::load_nc(p.offsets + seq + 1), lo), p.seq_len);
    start = lo;
    len = hi - lo;
  }
  const A gamma = p.gamma;
  const A c = p.gamma * p.lam;

  A carry_adv = A(0), carry_v = A(0);
  for (int64_t end = len; end > 0; end -= kTile) {
    const int64_t base = end > kTile ? end - kTile : 0;
    const int n = static_cast<int>(end - base);
    const int64_t g0 = start + base;
    // 1. coalesced loads of the tile into shared memory
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int idx = k * kThreads + tid;
      if (idx < n) {
        s_r[idx] = dev::to_acc(dev::load_nc(p.rewards + g0 + idx));
        s_v[idx] = dev::to_acc(dev::load_nc(p.values + g0 + idx));
        s_m[idx] = p.mask == nullptr ? uint8_t{1} : static_cast<uint8_t>(dev::load_nc(p.mask + g0 + idx) != 0);
      } else {
        s_m[idx] = 0;
      }
    }
    dev::sync_block();
    // 2. the map of this thread's chunk [tid * kItems, (tid + 1) * kItems)
    GaeMap<A> m = gae_identity<A>();
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      const int idx = tid * kItems + i;
      if (s_m[idx]) m = gae_compose(GaeMap<A>{c, gamma, s_r[idx] - s_v[idx], s_v[idx], A(1)}, m);
    }
    // 3. inclusive suffix scan over the warp's lanes, then one total per warp
#pragma unroll
    for (int d = 1; d < dev::kWarpSize; d *= 2) {
      const GaeMap<A> other = dev::shfl_down(m, d);
      if (lane + d < dev::kWarpSize) m = gae_compose(m, other);
    }
    GaeMap<A> later_lanes = dev::shfl_down(m, 1);
    if (lane == dev::kWarpSize - 1) later_lanes = gae_identity<A>();
    if (lane == 0) s_warp[warp] = m;
    dev::sync_block();
    // 4. the state entering this thread's chunk: carry, then later warps, then later lanes
    A adv = carry_adv, v_next = carry_v;
    for (int w = kWarps - 1; w > warp; --w) gae_apply(s_warp[w], adv, v_next);
    gae_apply(later_lanes, adv, v_next);
    // 5. replay the chunk; results overwrite the inputs in place (each slot is this thread's)
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      const int idx = tid * kItems + i;
      if (s_m[idx]) {
        const A v = s_v[idx];
        adv = c * adv + gamma * v_next + (s_r[idx] - v);  // A_t = delta_t + gamma lam A_{t+1}
        v_next = v;
        s_r[idx] = adv;
        s_v[idx] = adv + v;  // R_t = A_t + V_t
      } else {
        s_r[idx] = A(0);
        s_v[idx] = A(0);
      }
    }
    for (int w = kWarps - 1; w >= 0; --w) gae_apply(s_warp[w], carry_adv, carry_v);
    dev::sync_block();
    // 6. coalesced stores
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int idx = k * kThreads + tid;
      if (idx < n) {
        dev::store(p.advantages + g0 + idx, dev::from_acc<T>(s_r[idx]));
        dev::store(p.returns + g0 + idx, dev::from_acc<T>(s_v[idx]));
      }
    }
    // No barrier needed before the next tile: its loads write only this thread's own slots
    // (the ones it just stored from), and s_m / s_warp are rewritten after barriers that
    // every thread reaches only once done with this tile.
  }
}

}  // namespace rlhf_engine::kernels
