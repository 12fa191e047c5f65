// The Launcher (see op_common.h) of the CUDA build: kernels on the current stream of the
// tensors' device. Included only by csrc/cuda/*.cu (compiled by setup.py on a CUDA machine).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

namespace rlhf_engine::ops {

struct CudaLauncher {
  void check_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got ", t.device());
  }
  int threads(int preferred) const { return preferred; }
  int64_t max_grid_blocks() const {
    return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  }
  template <class P> void launch(void (*kernel)(P), int64_t grid, int block, const P& p) const {
    TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "grid of ", grid, " blocks exceeds the CUDA limit");
    kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(block), 0, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace rlhf_engine::ops
