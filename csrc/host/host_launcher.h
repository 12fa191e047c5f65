// The Launcher (see csrc/cuda/op_common.h) of the host backend: runs the CUDA op code on CPU
// tensors through dev::host::launch, under a seeded interleaving.
#pragma once

#include <ATen/ATen.h>

#include "host/runtime.h"

namespace rlhf_engine::host {

struct HostLauncher {
  dev::host::LaunchOptions options;
  int threads_override = 0;  // 0: the block size the CUDA launcher would pick
  int64_t grid_cap = 3;      // few blocks, so that grid-stride loops take several turns

  void check_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the host backend; got ", t.device());
  }
  int threads(int preferred) const { return threads_override > 0 ? threads_override : preferred; }
  int64_t max_grid_blocks() const { return grid_cap; }
  template <class P> void launch(void (*kernel)(P), int64_t grid, int block, const P& p) const {
    TORCH_CHECK(grid <= 1 << 20, "host backend: grid of ", grid, " blocks is too large for a test");
    dev::host::launch(static_cast<int>(grid), block, options, [&] { kernel(p); });
  }
};

}  // namespace rlhf_engine::host
