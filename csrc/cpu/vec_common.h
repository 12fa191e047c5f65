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

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
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

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// 2^y for fp32 vectors, ~2e-7 relative error (the minimax degree-5 polynomial of ATen's exp_u20,
// rewritten for base 2), with y clamped to [-126, 127]: inputs below -126 (including -inf) give
// 2^-126 ~ 1.2e-38 instead of 0, which leaves every sum of exponentials unchanged, keeps
// products with a clamped exponent finite, and never produces denormals. ~12 vector ops.
inline at::vec::Vectorized<float> exp2_clamped(const at::vec::Vectorized<float>& y_in) {
  // p(f) ~ 2^f on [-0.5, 0.5]: exp_u20's coefficients c_k of e^r scaled by ln2^k.
  constexpr float c1 = static_cast<float>(0.999999701 * kLn2);
  constexpr float c2 = static_cast<float>(0.499991506 * kLn2 * kLn2);
  constexpr float c3 = static_cast<float>(0.166676521 * kLn2 * kLn2 * kLn2);
  constexpr float c4 = static_cast<float>(0.0418978221 * kLn2 * kLn2 * kLn2 * kLn2);
  constexpr float c5 = static_cast<float>(0.00828929059 * kLn2 * kLn2 * kLn2 * kLn2 * kLn2);
#if defined(CPU_CAPABILITY_AVX512)
  __m512 y = _mm512_min_ps(_mm512_max_ps(y_in, _mm512_set1_ps(-126.f)), _mm512_set1_ps(127.f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(c5), f, _mm512_set1_ps(c4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);  // n into the exponent bits
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 y = _mm256_min_ps(_mm256_max_ps(y_in, _mm256_set1_ps(-126.f)), _mm256_set1_ps(127.f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(c5), f, _mm256_set1_ps(c4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);  // n into the exponent bits
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
#else
  const at::vec::Vectorized<float> lo(-126.f), hi(127.f), ln2(static_cast<float>(kLn2));
  return (at::vec::minimum(at::vec::maximum(y_in, lo), hi) * ln2).exp_u20();
#endif
}

// 2^y for fp64 vectors (the accurate exp; fp64 is for gradcheck), clamped like the fp32 version.
inline at::vec::Vectorized<double> exp2_clamped(const at::vec::Vectorized<double>& y_in) {
  const at::vec::Vectorized<double> lo(-1022.0), hi(1023.0), ln2(kLn2);
  return (at::vec::minimum(at::vec::maximum(y_in, lo), hi) * ln2).exp();
}

// Scalar 2^y with the same clamp, for the tails of rows.
template <typename T>
inline T exp2_clamped(T y) {
  const T lo = std::is_same_v<T, float> ? T(-126) : T(-1022);
  const T hi = std::is_same_v<T, float> ? T(127) : T(1023);
  return std::exp2(std::min(std::max(y, lo), hi));
}

// e^x with ~20 ulp error for fp32 (ATen's exp_u20), the accurate exp for fp64 (gradcheck).
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

// empty_like for a large output that is written once, front to back (the [N, V] gradients):
// asks the kernel for transparent huge pages before the first touch. A fresh 4 KiB-page buffer
// costs one page fault per 4 KiB on first write, which measured here as more time than the
// backward kernel itself; with huge pages it is one fault per 2 MiB. Advisory: if THP is off
// ("never") the call changes nothing.
inline at::Tensor empty_like_for_write(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = out.nbytes();
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes >= 2 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t aligned = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (begin + bytes) & ~(kHuge - 1);
    if (end > aligned) madvise(reinterpret_cast<void*>(aligned), end - aligned, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace rlhf_engine::cpu
