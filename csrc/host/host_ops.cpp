// Python bindings of the CUDA op code (csrc/cuda/*_op.h) running on the host backend, for tests (compiled as part of
// tests/cuda_host/module.cpp, the test extension).
// Every function takes CPU tensors plus the schedule: threads (block size; 0 = what the CUDA
// launcher picks), seed (the interleaving) and yield_prob (switch chance at each load/store).
// ATen and torch's pybind11 casters only: <torch/extension.h> (all of the C++ frontend) takes twice as long
// to compile (28 s against 15 s per file here), and this extension is built by every fresh checkout's tests.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "cuda/gae_op.h"
#include "cuda/kl_op.h"
#include "cuda/logprobs_op.h"
#include "host/host_launcher.h"

namespace rlhf_engine::host {
namespace {

// A small GAE shape for tests: 2 warps x 2 positions, so that short rows span several tiles.
struct GaeSmallConfig {
  static constexpr int kThreads = 64;
  static constexpr int kItems = 2;
};

HostLauncher launcher(int threads, uint64_t seed, double yield_prob) {
  HostLauncher L;
  L.threads_override = threads;
  L.options.seed = seed;
  L.options.yield_prob = yield_prob;
  return L;
}

}  // namespace

void bind_kernel_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "logprobs_fwd",
      [](const at::Tensor& logits, const at::Tensor& labels, double inv_t, int64_t ignore_index, bool with_entropy,
         int threads, uint64_t seed, double yield_prob) {
        return ops::logprobs_fwd_op(launcher(threads, seed, yield_prob), logits, labels, inv_t, ignore_index,
                                    with_entropy);
      },
      py::arg("logits"), py::arg("labels"), py::arg("inv_temperature"), py::arg("ignore_index"),
      py::arg("with_entropy"), py::arg("threads") = 0, py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
  m.def(
      "logprobs_bwd",
      [](const at::Tensor& g, const at::Tensor& g_ent, const at::Tensor& logits, const at::Tensor& labels,
         const at::Tensor& lse, const at::Tensor& entropy, double inv_t, int64_t ignore_index, bool in_place,
         int threads, uint64_t seed, double yield_prob) {
        return ops::logprobs_bwd_op(launcher(threads, seed, yield_prob), g, g_ent, logits, labels, lse, entropy,
                                    inv_t, ignore_index, in_place);
      },
      py::arg("grad_logprob"), py::arg("grad_entropy"), py::arg("logits"), py::arg("labels"), py::arg("lse"),
      py::arg("entropy"), py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("in_place") = false,
      py::arg("threads") = 0, py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
  m.def(
      "token_kl_fwd",
      [](const at::Tensor& logp, const at::Tensor& ref, int64_t kind, uint64_t seed, double yield_prob) {
        return ops::token_kl_fwd_op(launcher(0, seed, yield_prob), logp, ref, kind);
      },
      py::arg("logp"), py::arg("ref_logp"), py::arg("kind"), py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
  m.def(
      "token_kl_bwd",
      [](const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref, int64_t kind, uint64_t seed,
         double yield_prob) { return ops::token_kl_bwd_op(launcher(0, seed, yield_prob), grad, logp, ref, kind); },
      py::arg("grad"), py::arg("logp"), py::arg("ref_logp"), py::arg("kind"), py::arg("seed") = 0,
      py::arg("yield_prob") = 0.25);
  m.def(
      "full_kl_fwd",
      [](const at::Tensor& logits, const at::Tensor& ref, double inv_t, int threads, uint64_t seed,
         double yield_prob) { return ops::full_kl_fwd_op(launcher(threads, seed, yield_prob), logits, ref, inv_t); },
      py::arg("logits"), py::arg("ref_logits"), py::arg("inv_temperature"), py::arg("threads") = 0,
      py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
  m.def(
      "full_kl_bwd",
      [](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& ref, const at::Tensor& kl,
         const at::Tensor& lse, const at::Tensor& ref_lse, double inv_t, bool ref_grad, int threads, uint64_t seed,
         double yield_prob) {
        return ops::full_kl_bwd_op(launcher(threads, seed, yield_prob), grad, logits, ref, kl, lse, ref_lse, inv_t,
                                   ref_grad);
      },
      py::arg("grad"), py::arg("logits"), py::arg("ref_logits"), py::arg("kl"), py::arg("lse"), py::arg("ref_lse"),
      py::arg("inv_temperature"), py::arg("ref_grad"), py::arg("threads") = 0, py::arg("seed") = 0,
      py::arg("yield_prob") = 0.25);
  m.def(
      "gae",
      [](const at::Tensor& r, const at::Tensor& v, const at::Tensor& mask, double gamma, double lam, bool small_tiles,
         uint64_t seed, double yield_prob) {
        const HostLauncher L = launcher(0, seed, yield_prob);
        return small_tiles ? ops::gae_op<GaeSmallConfig>(L, r, v, mask, gamma, lam) : ops::gae_op(L, r, v, mask, gamma, lam);
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"),
      py::arg("small_tiles") = true, py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
  m.def(
      "gae_packed",
      [](const at::Tensor& r, const at::Tensor& v, const at::Tensor& offsets, double gamma, double lam,
         bool small_tiles, uint64_t seed, double yield_prob) {
        const HostLauncher L = launcher(0, seed, yield_prob);
        return small_tiles ? ops::gae_packed_op<GaeSmallConfig>(L, r, v, offsets, gamma, lam)
                           : ops::gae_packed_op(L, r, v, offsets, gamma, lam);
      },
      py::arg("rewards"), py::arg("values"), py::arg("offsets"), py::arg("gamma"), py::arg("lam"),
      py::arg("small_tiles") = true, py::arg("seed") = 0, py::arg("yield_prob") = 0.25);
}

}  // namespace rlhf_engine::host
