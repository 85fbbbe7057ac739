// Host emulation of the CUDA subset the csrc/cuda kernels use, for CPU tests only
// (compiled with -DIMAGEN_FAST_CUDA_EMULATION by tests/test_cuda_kernels.py; never
// part of the real build). The kernels' own source runs on the CPU:
//
// * each CUDA thread of a block is a cooperative fiber (ucontext); blocks run one
//   after another, so __shared__ (a static local here) is private to the running block;
// * __syncthreads() parks a thread until every live thread of the block arrives;
//   warp intrinsics (__shfl_xor_sync, __shfl_up_sync, __any_sync, __match_any_sync)
//   park it until every lane of its warp arrives, then exchange values as the hardware
//   does. A full-mask warp op with exited lanes, lanes of one warp at different ops,
//   or threads split between a barrier and a warp op are reported as errors (what
//   compute-sanitizer's synccheck would flag on a GPU);
// * device memory is host memory: kernels dereference the CPU tensors' pointers;
// * half/bfloat16 conversions are common.h's (round to nearest even), like the
//   hardware's __float2half_rn / __float2bfloat16_rn.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "imagen_fast/common.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------ types
struct alignas(8) uint2 {
  unsigned x, y;
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};

inline float __half2float(__half h) { return imagen_fast::f16_to_f32(h.x); }
inline __half __float2half_rn(float f) { return __half{imagen_fast::f32_to_f16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return imagen_fast::bf16_to_f32(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{imagen_fast::f32_to_bf16(f)}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

template <typename To, typename From> inline To emu_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "size");
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}
inline unsigned __float_as_uint(float f) { return emu_bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return emu_bit_cast<float>(u); }
inline long long __double_as_longlong(double d) { return emu_bit_cast<long long>(d); }
inline double __longlong_as_double(long long v) { return emu_bit_cast<double>(v); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

namespace emu {
// First error a kernel thread hit (a thread cannot throw across fibers); the launch
// reports it as a launch failure.
inline std::string g_kernel_error;
inline void report(const std::string& what) {
  if (g_kernel_error.empty()) g_kernel_error = what;
}
// A GPU faults on a vector access that is not aligned to its size.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    report("misaligned " + std::to_string(bytes) + "-byte access at " +
           std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
}
}  // namespace emu

template <typename T> inline T __ldg(const T* p) {
  emu::check_aligned(p, alignof(T));
  return *p;
}
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// One host thread runs all fibers: plain read-modify-write is atomic here.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}

// ---------------------------------------------------------------- runtime
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef void* cudaStream_t;

namespace emu {
inline cudaError_t g_last_error = cudaSuccess;
inline std::string g_error_detail;
}  // namespace emu

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorLaunchFailure";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : emu::g_error_detail.c_str();
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  if (n && !p) return cudaErrorInvalidValue;
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}

// ------------------------------------------------------------------ fibers
namespace emu {

enum class Op { None, Xor, Up, Any, Match };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  enum State { Ready, AtBarrier, AtWarp, Done } state = Ready;
  Op op = Op::None;
  unsigned mask = 0;
  int arg = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

constexpr size_t kStack = 96 * 1024;

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  std::function<void()> body;
  size_t current = 0;
  size_t live = 0;
};

inline Block& block() {
  static Block b;
  return b;
}

inline void fiber_main() {
  Block& b = block();
  b.body();
  b.fibers[b.current].state = Fiber::Done;
  // returning resumes uc_link (the scheduler)
}

inline void park(Fiber::State s) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.state = s;
  swapcontext(&f.ctx, &b.sched);
}

inline void fail(const std::string& what) { throw std::runtime_error("CUDA emulation: " + what); }

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp values are at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T> inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline uint64_t warp_op(Op op, unsigned mask, int arg, uint64_t value) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.value = value;
  park(Fiber::AtWarp);
  return block().fibers[block().current].result;
}

// Resolves warp w if all its live lanes wait at a warp op; returns whether it did.
inline bool resolve_warp(Block& b, size_t w) {
  const size_t lo = w * 32, hi = std::min(lo + 32, b.fibers.size());
  size_t waiting = 0, live = 0;
  for (size_t i = lo; i < hi; ++i) {
    if (b.fibers[i].state != Fiber::Done) ++live;
    if (b.fibers[i].state == Fiber::AtWarp) ++waiting;
  }
  if (waiting == 0 || waiting != live) return false;
  const Fiber& first = b.fibers[lo];
  if (hi - lo != 32 || live != 32) {
    fail("warp " + std::to_string(w) + " of block (" + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         ") ran a full-mask warp op with inactive or exited lanes");
  }
  for (size_t i = lo; i < hi; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.op != first.op || f.arg != first.arg || f.mask != 0xffffffffu) {
      fail("lanes of warp " + std::to_string(w) + " are at different warp ops (divergence)");
    }
  }
  for (size_t l = 0; l < 32; ++l) {
    Fiber& f = b.fibers[lo + l];
    switch (f.op) {
      case Op::Xor: f.result = b.fibers[lo + (l ^ static_cast<size_t>(f.arg))].value; break;
      case Op::Up:
        f.result = l >= static_cast<size_t>(f.arg) ? b.fibers[lo + l - f.arg].value : f.value;
        break;
      case Op::Any: {
        uint64_t any = 0;
        for (size_t k = 0; k < 32; ++k) any |= b.fibers[lo + k].value != 0;
        f.result = any;
        break;
      }
      case Op::Match: {
        uint64_t m = 0;
        for (size_t k = 0; k < 32; ++k) {
          if (b.fibers[lo + k].value == f.value) m |= uint64_t(1) << k;
        }
        f.result = m;
        break;
      }
      default: fail("unknown warp op");
    }
  }
  for (size_t i = lo; i < hi; ++i) b.fibers[i].state = Fiber::Ready;
  return true;
}

inline void run_block(unsigned threads) {
  Block& b = block();
  if (b.fibers.size() < threads) b.fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStack]);
    f.state = Fiber::Ready;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (size_t t = threads; t < b.fibers.size(); ++t) b.fibers[t].state = Fiber::Done;
  const size_t n = threads;
  for (;;) {
    for (size_t t = 0; t < n; ++t) {
      if (b.fibers[t].state != Fiber::Ready) continue;
      b.current = t;
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      swapcontext(&b.sched, &b.fibers[t].ctx);
    }
    size_t live = 0, at_barrier = 0, at_warp = 0;
    for (size_t t = 0; t < n; ++t) {
      const auto s = b.fibers[t].state;
      live += s != Fiber::Done;
      at_barrier += s == Fiber::AtBarrier;
      at_warp += s == Fiber::AtWarp;
    }
    if (live == 0) return;
    bool progressed = false;
    if (at_warp) {
      for (size_t w = 0; w * 32 < n; ++w) progressed |= resolve_warp(b, w);
    }
    if (progressed) continue;
    if (at_barrier == live) {
      for (size_t t = 0; t < n; ++t) {
        if (b.fibers[t].state == Fiber::AtBarrier) b.fibers[t].state = Fiber::Ready;
      }
      continue;
    }
    fail("deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
         "," + std::to_string(blockIdx.z) + "): " + std::to_string(at_barrier) +
         " threads at __syncthreads, " + std::to_string(at_warp) +
         " at warp ops, none can proceed (a barrier or warp op not reached by all)");
  }
}

// kernel<<<grid, block>>>(args...): blocks in order, each block's threads as fibers.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 blk, Args&&... args) {
  if (blk.y != 1 || blk.z != 1) fail("only 1-D blocks are emulated");
  if (blk.x == 0 || blk.x > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_error_detail = "invalid configuration argument";
    return;
  }
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  g_kernel_error.clear();
  Block& b = block();
  b.body = [&]() { std::apply(kernel, params); };
  gridDim = grid;
  blockDim = blk;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(blk.x);
      }
    }
  }
  b.body = nullptr;
  if (!g_kernel_error.empty()) {
    g_last_error = cudaErrorLaunchFailure;
    g_error_detail = g_kernel_error;
  }
}

}  // namespace emu

inline void __syncthreads() { emu::park(emu::Fiber::AtBarrier); }

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::from_bits<T>(emu::warp_op(emu::Op::Xor, mask, lane_mask, emu::to_bits(v)));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  return emu::from_bits<T>(emu::warp_op(emu::Op::Up, mask, static_cast<int>(delta), emu::to_bits(v)));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(emu::warp_op(emu::Op::Any, mask, 0, pred != 0));
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_op(emu::Op::Match, mask, 0, v));
}
