// Test-only kernels that prove the host backend catches missing barriers. Compiled only into
// the test extension. Two block-wide sums share one shared-memory array:
//   round 1: each warp writes its partial sum of x, every thread reads all partials
//   round 2: each warp writes its partial sum of x^2 into the same array, thread 0 reads them
// kBarrierAfterWrite = false drops the barrier between the writes and the reads (read-after-
// write race); kBarrierBeforeReuse = false drops the one before round 2 overwrites the array
// (write-after-read race). Only <true, true> is correct.
#pragma once

#include "cuda/primitives.cuh"

namespace rlhf_engine::test_kernels {

struct TwoSumsParams {
  const float* x;        // [B, n]
  int64_t n;
  float* sums;           // [B, block_dim]: round-1 total as seen by each thread
  float* sums_sq;        // [B]: round-2 total (thread 0)
};

template <bool kBarrierAfterWrite, bool kBarrierBeforeReuse> DEV_GLOBAL void two_sums_kernel(TwoSumsParams p) {
  DEV_SHARED(float, partial, [32]);
  const int tid = dev::thread_idx();
  const int64_t row = dev::block_idx();
  float s = 0.f, s2 = 0.f;
  for (int64_t i = tid; i < p.n; i += dev::block_dim()) {
    const float v = dev::load_nc(p.x + row * p.n + i);
    s += v;
    s2 += v * v;
  }
  auto plus = [](float a, float b) { return a + b; };
  s = dev::warp_allreduce(s, plus);
  if (dev::lane_idx() == 0) partial[dev::warp_idx()] = s;
  if (kBarrierAfterWrite) dev::sync_block();
  float total = 0.f;
  for (int w = 0; w < dev::num_warps(); ++w) total += partial[w];
  dev::store(p.sums + row * dev::block_dim() + tid, total);
  if (kBarrierBeforeReuse) dev::sync_block();
  s2 = dev::warp_allreduce(s2, plus);
  if (dev::lane_idx() == 0) partial[dev::warp_idx()] = s2;
  dev::sync_block();
  if (tid == 0) {
    float total_sq = 0.f;
    for (int w = 0; w < dev::num_warps(); ++w) total_sq += partial[w];
    dev::store(p.sums_sq + row, total_sq);
  }
}

}  // namespace rlhf_engine::test_kernels

namespace rlhf_engine::test_kernels {

// Errors a GPU makes silently (a hang, a fault, garbage) and the host backend reports.
struct FaultParams {
  const float* x;  // at least 8 floats, 16-byte aligned
  float* out;      // [block_dim]
  int fault;       // 0: none, 1: sync_block inside a branch only warp 0 takes, 2: misaligned 16-byte load,
                   // 3: a shuffle that only half of a warp reaches
};

DEV_GLOBAL void fault_kernel(FaultParams p) {
  const int tid = dev::thread_idx();
  float v = dev::load_nc(p.x + tid % 8);
  if (p.fault == 1 && dev::warp_idx() == 0) dev::sync_block();
  if (p.fault == 2) v += dev::load_vec_nc(p.x + 1).v[0];
  if (p.fault == 3 && dev::lane_idx() < 16) v += dev::shfl_xor(v, 1);
  dev::store(p.out + tid, v);
}

}  // namespace rlhf_engine::test_kernels
