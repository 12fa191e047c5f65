// Host backend of csrc/cuda/primitives.cuh: runs unchanged CUDA kernel source on the CPU.
//
// Each CUDA thread of a block is a fiber (ucontext, its own mmap'ed stack with a guard page).
// One OS thread runs the fibers of a block under a scheduler that, at every primitive
// (sync_block, warp shuffle, global load/store), may switch to another fiber picked by a
// seeded random generator. Each block draws one of two policies: uniform random choice, or
// random priorities with random change points (PCT-style), which starves some threads while
// others run ahead - the schedules that expose a missing barrier. A seed therefore names one
// interleaving exactly: a failure is reproducible, and running several seeds explores several
// schedules. Blocks run one after another, in an order shuffled by the same seed.
//
// The scheduler also checks what a GPU would only get wrong silently:
//   - sync_block reached by some threads while others exited or wait at a shuffle (divergence)
//   - a warp shuffle that not all 32 lanes of the warp reach, or reach with different sizes
//   - 16-byte vector accesses on pointers that are not 16-byte aligned
//   - shared memory read before written: it is poisoned with 0xFF bytes at each block start
// Errors raise dev::host::KernelError from launch(), naming the block, thread and primitive.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace dev::host {

class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LaunchOptions {
  uint64_t seed = 0;         // names the interleaving and the block order
  double yield_prob = 0.25;  // chance of a switch at each load/store primitive
};

// Runs body() as grid x block CUDA threads (1-D). block must be a multiple of 32, <= 1024.
void launch(int grid, int block, const LaunchOptions& options, const std::function<void()>& body);

// ---- called by primitives.cuh ----
int thread_idx();
int block_idx();
int block_dim();
int grid_dim();
int lane_idx();
void sync_block();
// Full-warp exchange: every lane gives `bytes` bytes and receives those of lane src_lane.
void warp_exchange(const void* in, void* out, size_t bytes, int src_lane);
void maybe_yield();
void check_aligned(const void* p, size_t alignment, const char* what);
void touch_shared(void* p, size_t bytes);

// ---- element types with the GPU's layout (2 bytes) ----
struct bf16 {
  uint16_t bits;
};
struct half {
  uint16_t bits;
};
float bf16_to_float(bf16 x);
bf16 float_to_bf16(float x);  // round to nearest even
float half_to_float(half x);
half float_to_half(float x);  // round to nearest even

float exp2f(float x);
double exp2d(double x);
float log2f(float x);
double log2d(double x);
float expf(float x);
double expd(double x);

}  // namespace dev::host
