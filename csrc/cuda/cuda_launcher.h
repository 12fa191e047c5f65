// The Launcher (see op_common.h) of the CUDA build: kernels on the current stream of the
// tensors' device. Included only by csrc/cuda/*.cu (compiled by setup.py on a CUDA machine).
// Only c10/cuda headers (stream, launch check): no cuBLAS/cuSPARSE headers are pulled in.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <limits>

namespace rlhf_engine::ops {

struct CudaLauncher {
  void check_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got ", t.device());
  }
  int threads(int preferred) const { return preferred; }
  int64_t max_grid_blocks() const {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return static_cast<int64_t>(sms) * 8;
  }
  template <class P> void launch(void (*kernel)(P), int64_t grid, int block, const P& p) const {
    TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "grid of ", grid, " blocks exceeds the CUDA limit");
    kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(block), 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace rlhf_engine::ops
