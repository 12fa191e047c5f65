// Shared helpers of the CPU kernels: vector width selection, dtype dispatch,
// loads of fp32/bf16/fp16/fp64 data into accumulator vectors, and small reductions.
//
// Include this header FIRST in every csrc/cpu/*.cpp: ATen's vec headers pick their
// implementation (512-bit, 256-bit or scalar) from the CPU_CAPABILITY_AVX512 /
// CPU_CAPABILITY_AVX2 macros, which torch's own build sets per translation unit and
// an extension does not get from -march. We derive them here from what the compiler
// targets (setup.py builds with -march=native), before vec.h is seen.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
// Our own inline namespace for the vec templates (at::vec::rlhf_engine_cpu), so that
// they can never be confused with libtorch's per-capability instantiations.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY rlhf_engine_cpu
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace rlhf_engine::cpu {

// Width in bits of the float vectors these kernels were compiled with (512, 256 or scalar).
constexpr int vector_bits() {
#if defined(CPU_CAPABILITY_AVX512)
  return 512;
#elif defined(CPU_CAPABILITY_AVX2)
  return 256;
#else
  return 8 * static_cast<int>(sizeof(float));
#endif
}

// Floating dtypes accepted by the kernels, in one switch (fp32, fp64, bf16, fp16).
#define RLHF_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Accumulator type: fp64 for fp64 data, fp32 for everything else.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// Elements consumed per step of the vector loops: two accumulator vectors
// (one bf16/fp16 vector converts to exactly two fp32 vectors).
template <typename scalar_t>
constexpr int64_t step() {
  return 2 * AccVec<scalar_t>::size();
}

// Loads step<scalar_t>() elements at p as two accumulator vectors.
template <typename scalar_t>
inline void load2(const scalar_t* p, AccVec<scalar_t>& a, AccVec<scalar_t>& b) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    at::vec::load_to_float<scalar_t>(p, a, b);
  } else {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
}

// Stores two accumulator vectors as step<scalar_t>() elements at p (rounded to scalar_t).
template <typename scalar_t>
inline void store2(scalar_t* p, const AccVec<scalar_t>& a, const AccVec<scalar_t>& b) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  } else {
    a.store(p);
    b.store(p + AccVec<scalar_t>::size());
  }
}

// exp with ~20 ulp error for fp32 (ATen's exp_u20: a degree-5 polynomial, no table),
// the accurate exp for fp64 (used by gradcheck).
template <typename T>
inline at::vec::Vectorized<T> fast_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename T>
inline T reduce_max(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](auto& a, auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline T reduce_sum(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](auto& a, auto& b) { return a + b; }, v);
}

// Rows per at::parallel_for task for a row length of `cols` elements (~64k elements a task).
inline int64_t row_grain(int64_t cols) {
  const int64_t per_task = 1 << 16;
  return std::max<int64_t>(1, per_task / std::max<int64_t>(cols, 1));
}

}  // namespace rlhf_engine::cpu
