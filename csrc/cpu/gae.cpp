// Generalized advantage estimation: a reverse scan per row, rows in parallel.
// Semantics: csrc/ops.cpp (gae / gae_packed). fp32 accumulation (fp64 for fp64 inputs).
#include "cpu/vec_common.h"

#include <torch/library.h>

namespace rlhf_engine::cpu {
namespace {

// Rows per parallel task: ~256k elements (~0.5 ms of scanning on one core here). Smaller
// batches run on one thread: measured on this shared 2-core machine, waking a second OpenMP
// thread for B=256, T=1024 cost 8-20 ms under load against 0.5 ms for the whole scan.
int64_t scan_grain(int64_t row_len) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(row_len, 1));
}

// One sequence of length T with stride 1, scanned from the end:
//   delta_t = r_t + gamma * V_next - V_t ; A_t = delta_t + gamma * lam * A_next ; R_t = A_t + V_t
// Masked positions (mask[t] == 0) give A_t = R_t = 0 and leave (V_next, A_next) unchanged;
// V_next = A_next = 0 after the last valid token. mask == nullptr means all valid.
template <typename scalar_t>
inline void scan_row(const scalar_t* r, const scalar_t* v, const bool* mask, int64_t T,
                     acc_t<scalar_t> gamma, acc_t<scalar_t> gamma_lam, acc_t<scalar_t>* adv,
                     acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  acc next_v = 0, next_a = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (mask != nullptr && !mask[t]) {
      adv[t] = 0;
      ret[t] = 0;
      continue;
    }
    const acc vt = static_cast<acc>(v[t]);
    const acc delta = static_cast<acc>(r[t]) + gamma * next_v - vt;
    next_a = delta + gamma_lam * next_a;
    next_v = vt;
    adv[t] = next_a;
    ret[t] = next_a + vt;
  }
}

void check_coeffs(double gamma, double lam, const char* op) {
  TORCH_CHECK_VALUE(gamma >= 0 && gamma <= 1, op, ": gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(lam >= 0 && lam <= 1, op, ": lam must be in [0, 1], got ", lam);
}

void check_values(const at::Tensor& rewards, const at::Tensor& values, int64_t dim, const char* op) {
  TORCH_CHECK(rewards.dim() == dim, op, ": rewards must be ", dim, "-D, got shape ", rewards.sizes());
  TORCH_CHECK(at::isFloatingType(rewards.scalar_type()), op, ": rewards must be floating, got ",
              rewards.scalar_type());
  TORCH_CHECK(values.sizes() == rewards.sizes(), op, ": values shape ", values.sizes(),
              " must equal rewards shape ", rewards.sizes());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), op, ": values dtype ",
              values.scalar_type(), " must equal rewards dtype ", rewards.scalar_type());
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous(), op,
              ": rewards and values must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_values(rewards, values, 2, "gae");
  check_coeffs(gamma, lam, "gae");
  TORCH_CHECK(mask.sizes() == rewards.sizes(), "gae: mask shape ", mask.sizes(),
              " must equal rewards shape ", rewards.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.is_contiguous(), "gae: mask must be contiguous");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty({B, T}, rewards.options().dtype(out_dtype));
  at::Tensor ret = at::empty({B, T}, rewards.options().dtype(out_dtype));
  RLHF_DISPATCH_FLOATING(rewards.scalar_type(), "gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const bool* m = mask.const_data_ptr<bool>();
    acc* a = adv.mutable_data_ptr<acc>();
    acc* rt = ret.mutable_data_ptr<acc>();
    const acc g = static_cast<acc>(gamma), gl = static_cast<acc>(gamma * lam);
    at::parallel_for(0, B, scan_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scan_row(r + b * T, v + b * T, m + b * T, T, g, gl, a + b * T, rt + b * T);
      }
    });
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_packed_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                  const at::Tensor& offsets, double gamma, double lam) {
  check_values(rewards, values, 1, "gae_packed");
  check_coeffs(gamma, lam, "gae_packed");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, "gae_packed: offsets must be 1-D [B + 1], got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "gae_packed: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.is_contiguous(), "gae_packed: offsets must be contiguous");
  const int64_t L = rewards.size(0), B = offsets.size(0) - 1;
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0, "gae_packed: offsets[0] must be 0, got ", off[0]);
  TORCH_CHECK_VALUE(off[B] == L, "gae_packed: offsets[-1] = ", off[B], " must equal the packed length ", L);
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(off[i + 1] >= off[i], "gae_packed: offsets must be non-decreasing, but offsets[", i + 1,
                "] = ", off[i + 1], " < offsets[", i, "] = ", off[i]);
  }
  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty({L}, rewards.options().dtype(out_dtype));
  at::Tensor ret = at::empty({L}, rewards.options().dtype(out_dtype));
  RLHF_DISPATCH_FLOATING(rewards.scalar_type(), "gae_packed_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    acc* a = adv.mutable_data_ptr<acc>();
    acc* rt = ret.mutable_data_ptr<acc>();
    const acc g = static_cast<acc>(gamma), gl = static_cast<acc>(gamma * lam);
    const int64_t mean_len = std::max<int64_t>(1, L / std::max<int64_t>(B, 1));
    at::parallel_for(0, B, scan_grain(mean_len), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t s = off[b];
        scan_row<scalar_t>(r + s, v + s, nullptr, off[b + 1] - s, g, gl, a + s, rt + s);
      }
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("gae_packed", &gae_packed_cpu);
}

}  // namespace rlhf_engine::cpu
