// The test extension: the CUDA op code on the host backend (csrc/host/host_ops.cpp) plus the
// deliberately racy kernels of race_kernels.cuh.
// ATen and torch's pybind11 casters only: <torch/extension.h> (all of the C++ frontend) takes twice as long
// to compile (28 s against 15 s per file here), and this extension is built by every fresh checkout's tests.
// host_ops.cpp is compiled as part of this file, not as a second translation unit: parsing ATen's and pybind11's
// headers is most of each file's compile (~12 of its 14 CPU-s at -O0), so one unit takes 20 CPU-s at -O2 instead
// of 35 (measured here, 2026-12-08).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "host/host_launcher.h"
#include "host/host_ops.cpp"
#include "race_kernels.cuh"

namespace {

using rlhf_engine::host::HostLauncher;
using rlhf_engine::test_kernels::two_sums_kernel;
using rlhf_engine::test_kernels::TwoSumsParams;

// variant: "correct", "no_barrier_after_write" or "no_barrier_before_reuse".
std::tuple<at::Tensor, at::Tensor> two_sums(const at::Tensor& x_in, const std::string& variant, int threads,
                                            uint64_t seed, double yield_prob) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be float32 [B, n]; got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  at::Tensor sums = at::empty({x.size(0), threads}, x.options());
  at::Tensor sums_sq = at::empty({x.size(0)}, x.options());
  TwoSumsParams p{x.data_ptr<float>(), x.size(1), sums.data_ptr<float>(), sums_sq.data_ptr<float>()};
  HostLauncher L;
  L.options.seed = seed;
  L.options.yield_prob = yield_prob;
  if (variant == "correct")
    L.launch(&two_sums_kernel<true, true>, x.size(0), threads, p);
  else if (variant == "no_barrier_after_write")
    L.launch(&two_sums_kernel<false, true>, x.size(0), threads, p);
  else if (variant == "no_barrier_before_reuse")
    L.launch(&two_sums_kernel<true, false>, x.size(0), threads, p);
  else
    TORCH_CHECK(false, "variant must be correct, no_barrier_after_write or no_barrier_before_reuse; got ", variant);
  return {sums, sums_sq};
}

// Runs fault_kernel with 64 threads; raises what the host backend detects.
at::Tensor fault(int64_t kind, uint64_t seed) {
  alignas(16) static float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  at::Tensor out = at::zeros({64});
  rlhf_engine::test_kernels::FaultParams p{x, out.data_ptr<float>(), static_cast<int>(kind)};
  HostLauncher L;
  L.options.seed = seed;
  L.launch(&rlhf_engine::test_kernels::fault_kernel, 1, 64, p);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  rlhf_engine::host::bind_kernel_ops(m);
  m.def("two_sums", &two_sums, pybind11::arg("x"), pybind11::arg("variant"), pybind11::arg("threads"),
        pybind11::arg("seed"), pybind11::arg("yield_prob") = 0.25);
  m.def("fault", &fault, pybind11::arg("kind"), pybind11::arg("seed") = 0);
}
