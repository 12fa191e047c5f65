// The device primitives every kernel in csrc/cuda/*.cuh is written against, and nothing else.
//
// Two backends implement this one interface:
//   nvcc (__CUDACC__)      the real thing: builtins, __syncthreads, __shfl_*_sync, ld.global.nc.v4
//   host (RLHF_HOST_BACKEND) csrc/host/runtime.h: each CUDA thread a fiber under a seeded random
//                          scheduler, so the unchanged kernel source runs on the CPU in tests
//
// The set, on purpose small:
//   indices      thread_idx, block_idx, block_dim, grid_dim, lane_idx, warp_idx, num_warps (1-D only)
//   barriers     sync_block                          (__syncthreads)
//   warp         shfl_xor, shfl_down                 (full-warp; any trivially copyable 4-byte-multiple T)
//   shared mem   DEV_SHARED(type, name, dims)        (__shared__, 16-byte aligned)
//   global mem   load_vec_nc, load_vec, store_vec    (16-byte vectors; pointer must be 16-byte aligned)
//                load_nc, store                      (scalars)
//   math         exp2 (fast on the GPU), log2, float <-> bf16/fp16 conversions
// Kernels are `DEV_GLOBAL void k(Params p)` with 1-D grids and block sizes that are multiples of 32.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#elif defined(RLHF_HOST_BACKEND)
#include "host/runtime.h"
#else
#error "csrc/cuda/primitives.cuh needs nvcc (__CUDACC__) or the host backend (RLHF_HOST_BACKEND)"
#endif

#if defined(__CUDACC__)
#define DEV_GLOBAL __global__
#define DEV_INLINE __device__ __forceinline__
#define DEV_HD __host__ __device__ __forceinline__
#define DEV_LAUNCH_BOUNDS(max_threads, min_blocks) __launch_bounds__(max_threads, min_blocks)
#define DEV_RESTRICT __restrict__
#define DEV_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#else
#define DEV_GLOBAL
#define DEV_INLINE inline
#define DEV_HD inline
#define DEV_LAUNCH_BOUNDS(max_threads, min_blocks)
#define DEV_RESTRICT __restrict__
// One static object per kernel instantiation: host blocks run one after another, so it is
// per-block shared memory. The runtime poisons it (all bytes 0xFF: NaN floats, -1 ints)
// the first time each block touches it, so a read before any write shows up in results.
#define DEV_SHARED(type, name, dims) \
  alignas(16) static type name dims; \
  ::dev::host::touch_shared(&name, sizeof(name))
#endif

namespace dev {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;

// ---- element types -------------------------------------------------------------------
#if defined(__CUDACC__)
using bf16 = __nv_bfloat16;
using half = __half;
DEV_INLINE float to_float(bf16 x) { return __bfloat162float(x); }
DEV_INLINE float to_float(half x) { return __half2float(x); }
template <class T> DEV_INLINE T from_float(float x);
template <> DEV_INLINE bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> DEV_INLINE half from_float<half>(float x) { return __float2half_rn(x); }
#else
using bf16 = host::bf16;
using half = host::half;
inline float to_float(bf16 x) { return host::bf16_to_float(x); }
inline float to_float(half x) { return host::half_to_float(x); }
template <class T> inline T from_float(float x);
template <> inline bf16 from_float<bf16>(float x) { return host::float_to_bf16(x); }
template <> inline half from_float<half>(float x) { return host::float_to_half(x); }
#endif
DEV_INLINE float to_float(float x) { return x; }
DEV_INLINE double to_float(double x) { return x; }
template <> DEV_INLINE float from_float<float>(float x) { return x; }

// Accumulation type: fp32 for every 16/32-bit type, fp64 for fp64.
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

template <class T> DEV_INLINE acc_t<T> to_acc(T x) { return static_cast<acc_t<T>>(to_float(x)); }
template <class T> DEV_INLINE T from_acc(acc_t<T> x);
template <> DEV_INLINE float from_acc<float>(float x) { return x; }
template <> DEV_INLINE double from_acc<double>(double x) { return x; }
template <> DEV_INLINE bf16 from_acc<bf16>(float x) { return from_float<bf16>(x); }
template <> DEV_INLINE half from_acc<half>(float x) { return from_float<half>(x); }

// The most negative finite value: the online max starts here (not at -inf, so that
// max - max never is inf - inf), and -inf logits are clamped to it where they are
// multiplied by a zero probability.
template <class A> DEV_HD A lowest();
template <> DEV_HD float lowest<float>() { return -3.402823466e+38f; }
template <> DEV_HD double lowest<double>() { return -1.7976931348623157e+308; }

template <class A> DEV_HD A quiet_nan();
template <> DEV_HD float quiet_nan<float>() {
  const uint32_t bits = 0x7fc00000u;
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}
template <> DEV_HD double quiet_nan<double>() {
  const uint64_t bits = 0x7ff8000000000000ull;
  double x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

// ---- 16-byte vectors -----------------------------------------------------------------
template <class T> struct alignas(16) Vec {
  static constexpr int N = kVecBytes / static_cast<int>(sizeof(T));
  T v[N];
};

// ---- math ----------------------------------------------------------------------------
#if defined(__CUDACC__)
// One MUFU.EX2 (flush-to-zero): the inner loops' only transcendental.
DEV_INLINE float exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
DEV_INLINE double exp2(double x) { return ::exp2(x); }
DEV_INLINE float log2(float x) { return ::log2f(x); }
DEV_INLINE double log2(double x) { return ::log2(x); }
DEV_INLINE float exp(float x) { return ::expf(x); }
DEV_INLINE double exp(double x) { return ::exp(x); }
DEV_INLINE float fabs(float x) { return ::fabsf(x); }
DEV_INLINE double fabs(double x) { return ::fabs(x); }
#else
inline float exp2(float x) { return host::exp2f(x); }
inline double exp2(double x) { return host::exp2d(x); }
inline float log2(float x) { return host::log2f(x); }
inline double log2(double x) { return host::log2d(x); }
inline float exp(float x) { return host::expf(x); }
inline double exp(double x) { return host::expd(x); }
inline float fabs(float x) { return x < 0 ? -x : x; }
inline double fabs(double x) { return x < 0 ? -x : x; }
#endif
template <class A> DEV_HD A max(A a, A b) { return a > b ? a : b; }
template <class A> DEV_HD A min(A a, A b) { return a < b ? a : b; }

template <class A> struct Const {
  static constexpr A kLog2e = static_cast<A>(1.4426950408889634);
  static constexpr A kLn2 = static_cast<A>(0.6931471805599453);
};

#if defined(__CUDACC__)
// ---- indices, barriers ---------------------------------------------------------------
DEV_INLINE int thread_idx() { return static_cast<int>(threadIdx.x); }
DEV_INLINE int block_idx() { return static_cast<int>(blockIdx.x); }
DEV_INLINE int block_dim() { return static_cast<int>(blockDim.x); }
DEV_INLINE int grid_dim() { return static_cast<int>(gridDim.x); }
DEV_INLINE void sync_block() { __syncthreads(); }

// ---- warp shuffles (full warp), any 4-byte-multiple trivially copyable T --------------
template <class T> DEV_INLINE T shfl_xor(T x, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are whole 32-bit words");
  unsigned w[sizeof(T) / 4];
  memcpy(w, &x, sizeof(T));
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], lane_mask);
  memcpy(&x, w, sizeof(T));
  return x;
}
// Value of lane (lane + delta); lanes past 31 keep their own value.
template <class T> DEV_INLINE T shfl_down(T x, int delta) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are whole 32-bit words");
  unsigned w[sizeof(T) / 4];
  memcpy(w, &x, sizeof(T));
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_down_sync(0xffffffffu, w[i], delta);
  memcpy(&x, w, sizeof(T));
  return x;
}

// ---- global memory -------------------------------------------------------------------
// Read-only path (LDG.E.128.CONSTANT): only for buffers no thread writes during the kernel.
template <class T> DEV_INLINE Vec<T> load_vec_nc(const T* p) {
  uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}
// Coherent path (LDG.E.128): for buffers the kernel also writes (in-place backward).
template <class T> DEV_INLINE Vec<T> load_vec(const T* p) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  Vec<T> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}
template <class T> DEV_INLINE void store_vec(T* p, const Vec<T>& x) {
  uint4 raw;
  memcpy(&raw, &x, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}
template <class T> DEV_INLINE T load_nc(const T* p) { return __ldg(p); }
template <class T> DEV_INLINE void store(T* p, T x) { *p = x; }
#else
DEV_INLINE int thread_idx() { return host::thread_idx(); }
DEV_INLINE int block_idx() { return host::block_idx(); }
DEV_INLINE int block_dim() { return host::block_dim(); }
DEV_INLINE int grid_dim() { return host::grid_dim(); }
DEV_INLINE void sync_block() { host::sync_block(); }

template <class T> inline T shfl_xor(T x, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are whole 32-bit words");
  T out;
  host::warp_exchange(&x, &out, sizeof(T), host::lane_idx() ^ lane_mask);
  return out;
}
template <class T> inline T shfl_down(T x, int delta) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are whole 32-bit words");
  const int src = host::lane_idx() + delta;
  T out;
  host::warp_exchange(&x, &out, sizeof(T), src < kWarpSize ? src : host::lane_idx());
  return out;
}

template <class T> inline Vec<T> load_vec_nc(const T* p) {
  host::check_aligned(p, kVecBytes, "load_vec_nc");
  host::maybe_yield();
  Vec<T> out;
  memcpy(&out, p, sizeof(out));
  return out;
}
template <class T> inline Vec<T> load_vec(const T* p) {
  host::check_aligned(p, kVecBytes, "load_vec");
  host::maybe_yield();
  Vec<T> out;
  memcpy(&out, p, sizeof(out));
  return out;
}
template <class T> inline void store_vec(T* p, const Vec<T>& x) {
  host::check_aligned(p, kVecBytes, "store_vec");
  host::maybe_yield();
  memcpy(p, &x, sizeof(x));
}
template <class T> inline T load_nc(const T* p) {
  host::maybe_yield();
  return *p;
}
template <class T> inline void store(T* p, T x) {
  host::maybe_yield();
  *p = x;
}
#endif

DEV_INLINE int lane_idx() { return thread_idx() % kWarpSize; }
DEV_INLINE int warp_idx() { return thread_idx() / kWarpSize; }
DEV_INLINE int num_warps() { return block_dim() / kWarpSize; }

// Elements before the first 16-byte boundary at or after p (0 when p is aligned), at most n.
template <class T> DEV_INLINE int64_t misaligned_head(const T* p, int64_t n) {
  const int64_t bytes = static_cast<int64_t>((kVecBytes - reinterpret_cast<uintptr_t>(p) % kVecBytes) % kVecBytes);
  const int64_t head = bytes / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Butterfly all-reduce over the warp: every lane ends with combine(all 32 lanes).
template <class S, class Combine> DEV_INLINE S warp_allreduce(S x, Combine combine) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m /= 2) x = combine(x, shfl_xor(x, m));
  return x;
}

}  // namespace dev
