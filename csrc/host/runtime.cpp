// Fiber scheduler behind csrc/host/runtime.h (see there for what it does and checks).
#include "host/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <unordered_set>
#include <vector>

namespace dev::host {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxShuffleBytes = 64;

enum class State { kRunnable, kAtBarrier, kAtShuffle, kDone };

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kAtBarrier: return "at sync_block";
    case State::kAtShuffle: return "at a warp shuffle";
    case State::kDone: return "exited";
  }
  return "?";
}

// A fiber stack with a PROT_NONE guard page below it: an overflow faults instead of
// silently corrupting a neighbour.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_ = kStackBytes + page;
    void* mem = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("host backend: mmap of a fiber stack failed");
    mprotect(mem, page, PROT_NONE);
    base_ = static_cast<char*>(mem);
    page_ = page;
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, size_); }
  char* top_region() const { return base_ + page_; }
  size_t usable() const { return size_ - page_; }

 private:
  char* base_ = nullptr;
  size_t size_ = 0;
  size_t page_ = 0;
};

struct Fiber {
  ucontext_t ctx{};
  int tid = 0;
  State state = State::kRunnable;
  unsigned char shfl_in[kMaxShuffleBytes];
  void* shfl_out = nullptr;
  size_t shfl_bytes = 0;
  int shfl_src = 0;
};

struct Block {
  int block_idx = 0;
  int block_dim = 0;
  int grid_dim = 0;
  const std::function<void()>* body = nullptr;
  std::mt19937_64* rng = nullptr;
  double yield_prob = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler{};
  int current = -1;
  std::string error;  // first error raised inside a fiber
  // Scheduling policy of this block, drawn from the seed: uniform random choice among the
  // runnable fibers, or priorities (the runnable fiber with the highest priority runs; a
  // random permutation, lowered for the running fiber at random change points, as in PCT),
  // which starves low-priority threads: the schedules that expose missing barriers.
  bool by_priority = false;
  std::vector<uint32_t> priority;
  uint32_t lowest_priority = 0;
  std::unordered_set<void*> shared_touched;
};

// The block being run by this OS thread (the fibers' only way back to their scheduler).
thread_local Block* t_block = nullptr;
// Kernels' shared memory is static storage (see DEV_SHARED): one launch at a time.
std::mutex g_launch_mutex;

Fiber& self() {
  if (t_block == nullptr || t_block->current < 0)
    throw KernelError("host backend: a device primitive was called outside a kernel launch");
  return t_block->fibers[static_cast<size_t>(t_block->current)];
}

void switch_to_scheduler() {
  Block* b = t_block;
  swapcontext(&b->fibers[static_cast<size_t>(b->current)].ctx, &b->scheduler);
}

[[noreturn]] void fail(const std::string& what) {
  throw KernelError("block " + std::to_string(t_block->block_idx) + " thread " + std::to_string(self().tid) +
                    ": " + what);
}

void fiber_entry() {
  Block* b = t_block;
  Fiber& f = b->fibers[static_cast<size_t>(b->current)];
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  f.state = State::kDone;
  swapcontext(&f.ctx, &b->scheduler);  // never resumed
}

std::string describe_states(const Block& b) {
  std::string out;
  for (int w = 0; w * kWarp < b.block_dim; ++w) {
    out += "\n  warp " + std::to_string(w) + ":";
    for (int l = 0; l < kWarp; ++l) {
      out += " ";
      out += state_name(b.fibers[static_cast<size_t>(w * kWarp + l)].state);
      if (l < kWarp - 1) out += ",";
    }
  }
  return out;
}

// Completes the warp's shuffle when all 32 lanes wait at one; returns whether it did.
bool try_release_warp(Block& b, int warp) {
  Fiber* lanes = &b.fibers[static_cast<size_t>(warp * kWarp)];
  for (int l = 0; l < kWarp; ++l)
    if (lanes[l].state != State::kAtShuffle) return false;
  for (int l = 0; l < kWarp; ++l) {
    if (lanes[l].shfl_bytes != lanes[0].shfl_bytes)
      throw KernelError("block " + std::to_string(b.block_idx) + " warp " + std::to_string(warp) +
                        ": lanes shuffle values of different sizes (divergent shuffles)");
  }
  for (int l = 0; l < kWarp; ++l) {
    const Fiber& src = lanes[lanes[l].shfl_src];
    memcpy(lanes[l].shfl_out, src.shfl_in, lanes[l].shfl_bytes);
  }
  for (int l = 0; l < kWarp; ++l) lanes[l].state = State::kRunnable;
  return true;
}

bool try_release_barrier(Block& b) {
  for (const Fiber& f : b.fibers)
    if (f.state != State::kAtBarrier) return false;
  for (Fiber& f : b.fibers) f.state = State::kRunnable;
  return true;
}

void run_block(Block& b, std::vector<std::unique_ptr<Stack>>& stacks) {
  b.fibers.assign(static_cast<size_t>(b.block_dim), Fiber{});
  for (int t = 0; t < b.block_dim; ++t) {
    Fiber& f = b.fibers[static_cast<size_t>(t)];
    f.tid = t;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[static_cast<size_t>(t)]->top_region();
    f.ctx.uc_stack.ss_size = stacks[static_cast<size_t>(t)]->usable();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  b.by_priority = (*b.rng)() % 2 == 0;
  b.priority.resize(static_cast<size_t>(b.block_dim));
  std::iota(b.priority.begin(), b.priority.end(), static_cast<uint32_t>(b.block_dim) + 1);
  std::shuffle(b.priority.begin(), b.priority.end(), *b.rng);
  b.lowest_priority = static_cast<uint32_t>(b.block_dim) + 1;
  std::vector<int> runnable;
  runnable.reserve(static_cast<size_t>(b.block_dim));
  for (;;) {
    runnable.clear();
    int done = 0;
    for (const Fiber& f : b.fibers) {
      if (f.state == State::kRunnable) runnable.push_back(f.tid);
      if (f.state == State::kDone) ++done;
    }
    if (runnable.empty()) {
      if (done == b.block_dim) return;
      throw KernelError("block " + std::to_string(b.block_idx) +
                        ": deadlock - threads wait at a barrier or shuffle that others never reach "
                        "(divergent sync_block or shuffle, or an early exit):" +
                        describe_states(b));
    }
    if (b.by_priority) {
      b.current = *std::max_element(runnable.begin(), runnable.end(), [&](int x, int y) {
        return b.priority[static_cast<size_t>(x)] < b.priority[static_cast<size_t>(y)];
      });
    } else {
      std::uniform_int_distribution<size_t> pick(0, runnable.size() - 1);
      b.current = runnable[pick(*b.rng)];
    }
    Fiber& f = b.fibers[static_cast<size_t>(b.current)];
    swapcontext(&b.scheduler, &f.ctx);
    const int tid = b.current;
    b.current = -1;
    if (!b.error.empty())
      throw KernelError("block " + std::to_string(b.block_idx) + " thread " + std::to_string(tid) + ": " + b.error);
    if (f.state == State::kAtShuffle) try_release_warp(b, tid / kWarp);
    if (f.state == State::kAtBarrier) try_release_barrier(b);
  }
}

uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

}  // namespace

void launch(int grid, int block, const LaunchOptions& options, const std::function<void()>& body) {
  if (block <= 0 || block > 1024 || block % kWarp != 0)
    throw KernelError("host launch: block size must be a positive multiple of 32 up to 1024; got " +
                      std::to_string(block));
  if (grid < 0) throw KernelError("host launch: negative grid size " + std::to_string(grid));
  if (t_block != nullptr) throw KernelError("host launch: kernels cannot launch kernels");
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::mt19937_64 rng(options.seed);
  std::vector<int> order(static_cast<size_t>(grid));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::unique_ptr<Stack>> stacks;
  for (int t = 0; t < block; ++t) stacks.push_back(std::make_unique<Stack>());
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.body = &body;
  b.rng = &rng;
  b.yield_prob = options.yield_prob;
  struct Reset {
    ~Reset() { t_block = nullptr; }
  } reset;
  t_block = &b;
  for (int idx : order) {
    b.block_idx = idx;
    b.error.clear();
    b.shared_touched.clear();
    run_block(b, stacks);
  }
}

int thread_idx() { return self().tid; }
int block_idx() { return t_block->block_idx; }
int block_dim() { return t_block->block_dim; }
int grid_dim() { return t_block->grid_dim; }
int lane_idx() { return self().tid % kWarp; }

void sync_block() {
  self().state = State::kAtBarrier;
  switch_to_scheduler();
}

void warp_exchange(const void* in, void* out, size_t bytes, int src_lane) {
  Fiber& f = self();
  if (bytes > kMaxShuffleBytes) fail("shuffle of " + std::to_string(bytes) + " bytes exceeds the host limit");
  if (src_lane < 0 || src_lane >= kWarp) fail("shuffle source lane " + std::to_string(src_lane) + " out of range");
  memcpy(f.shfl_in, in, bytes);
  f.shfl_out = out;
  f.shfl_bytes = bytes;
  f.shfl_src = src_lane;
  f.state = State::kAtShuffle;
  switch_to_scheduler();
}

void maybe_yield() {
  Block* b = t_block;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (u(*b->rng) >= b->yield_prob) return;
  if (b->by_priority && b->lowest_priority > 0 && u(*b->rng) < 0.05)  // a PCT change point
    b->priority[static_cast<size_t>(b->current)] = --b->lowest_priority;
  switch_to_scheduler();
}

void check_aligned(const void* p, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0)
    fail(std::string(what) + " at address " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
         " is not aligned to " + std::to_string(alignment) + " bytes (a GPU would fault)");
}

void touch_shared(void* p, size_t bytes) {
  if (t_block->shared_touched.insert(p).second) memset(p, 0xFF, bytes);
}

float bf16_to_float(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

bf16 float_to_bf16(float x) {
  uint32_t u = float_bits(x);
  if (std::isnan(x)) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

float half_to_float(half x) {
  _Float16 h;
  memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}

half float_to_half(float x) {
  _Float16 h = static_cast<_Float16>(x);
  half out;
  memcpy(&out.bits, &h, 2);
  return out;
}

float exp2f(float x) { return std::exp2(x); }
double exp2d(double x) { return std::exp2(x); }
float log2f(float x) { return std::log2(x); }
double log2d(double x) { return std::log2(x); }
float expf(float x) { return std::exp(x); }
double expd(double x) { return std::exp(x); }

}  // namespace dev::host
