// gae / gae_packed on a Launcher (see op_common.h).
#pragma once

#include <tuple>

#include "cuda/gae.cuh"
#include "cuda/op_common.h"

namespace rlhf_engine::ops {

inline void check_discount(double gamma, double lam) {
  TORCH_CHECK(gamma >= 0 && gamma <= 1, "gamma must be in [0, 1]; got ", gamma);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1]; got ", lam);
}


// Calls f(TypeTag<T>{}) for float32 / float64 rewards.
template <class F> void dispatch_gae(const at::Tensor& rewards, F&& f) {
  switch (rewards.scalar_type()) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    default: TORCH_CHECK(false, "rewards must be float32 or float64; got ", rewards.scalar_type());
  }
}

template <class Config = kernels::GaeDefaultConfig, class Launcher>
std::tuple<at::Tensor, at::Tensor> gae_op(const Launcher& L, const at::Tensor& rewards_in, const at::Tensor& values_in,
                                          const at::Tensor& mask_in, double gamma, double lam) {
  L.check_device(rewards_in, "rewards");
  L.check_device(values_in, "values");
  L.check_device(mask_in, "mask");
  check_discount(gamma, lam);
  TORCH_CHECK(rewards_in.dim() == 2, "rewards must be 2-D [B, T]; got shape ", rewards_in.sizes());
  check_same_shape(rewards_in, "rewards", values_in, "values");
  check_same_shape(rewards_in, "rewards", mask_in, "mask");
  check_same_dtype(rewards_in, "rewards", values_in, "values");
  const at::Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous();
  const at::Tensor mask = mask_in.to(at::kBool).contiguous();
  at::Tensor adv = at::empty_like(rewards, at::MemoryFormat::Contiguous);
  at::Tensor ret = at::empty_like(rewards, at::MemoryFormat::Contiguous);
  if (rewards.numel() == 0) return {adv, ret};
  dispatch_gae(rewards, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::GaeParams<T> p{};
    p.rewards = ptr<T>(rewards);
    p.values = ptr<T>(values);
    p.mask = ptr<uint8_t>(mask);
    p.offsets = nullptr;
    p.advantages = ptr<T>(adv);
    p.returns = ptr<T>(ret);
    p.seq_len = rewards.size(1);
    p.gamma = static_cast<A>(gamma);
    p.lam = static_cast<A>(lam);
    L.launch(&kernels::gae_kernel<T, Config::kThreads, Config::kItems>, rewards.size(0), Config::kThreads, p);
  });
  return {adv, ret};
}

// Positions no sequence covers come out 0. Offsets are clamped into [0, L] on the device (no
// host sync here); the Python face validates them.
template <class Config = kernels::GaeDefaultConfig, class Launcher>
std::tuple<at::Tensor, at::Tensor> gae_packed_op(const Launcher& L, const at::Tensor& rewards_in,
                                                 const at::Tensor& values_in, const at::Tensor& offsets_in,
                                                 double gamma, double lam) {
  L.check_device(rewards_in, "rewards");
  L.check_device(values_in, "values");
  L.check_device(offsets_in, "offsets");
  check_discount(gamma, lam);
  TORCH_CHECK(rewards_in.dim() == 1, "rewards must be 1-D [L] (packed); got shape ", rewards_in.sizes());
  check_same_shape(rewards_in, "rewards", values_in, "values");
  check_same_dtype(rewards_in, "rewards", values_in, "values");
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) >= 1, "offsets must be 1-D [B + 1]; got shape ",
              offsets_in.sizes());
  TORCH_CHECK(offsets_in.scalar_type() == at::kLong, "offsets must be int64; got ", offsets_in.scalar_type());
  const at::Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  at::Tensor adv = at::zeros_like(rewards, at::MemoryFormat::Contiguous);
  at::Tensor ret = at::zeros_like(rewards, at::MemoryFormat::Contiguous);
  const int64_t n_seq = offsets.size(0) - 1;
  if (rewards.numel() == 0 || n_seq == 0) return {adv, ret};
  dispatch_gae(rewards, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = dev::acc_t<T>;
    kernels::GaeParams<T> p{};
    p.rewards = ptr<T>(rewards);
    p.values = ptr<T>(values);
    p.mask = nullptr;
    p.offsets = ptr<int64_t>(offsets);
    p.advantages = ptr<T>(adv);
    p.returns = ptr<T>(ret);
    p.seq_len = rewards.size(0);
    p.gamma = static_cast<A>(gamma);
    p.lam = static_cast<A>(lam);
    L.launch(&kernels::gae_kernel<T, Config::kThreads, Config::kItems>, n_seq, Config::kThreads, p);
  });
  return {adv, ret};
}

}  // namespace rlhf_engine::ops
