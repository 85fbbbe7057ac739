// OpenMP thread identity, with a serial fallback when the build has no OpenMP.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace imagen_fast {
namespace cpu {

#ifdef _OPENMP
inline int thread_id() { return omp_get_thread_num(); }
inline int team_size() { return omp_get_num_threads(); }
#else
inline int thread_id() { return 0; }
inline int team_size() { return 1; }
#endif

// Threads for a kernel call: the request (<= 0: OpenMP's default), one for small work.
inline int pick_threads(int threads, int64_t numel) {
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#else
  threads = 1;
#endif
  if (numel < (int64_t(1) << 15)) threads = 1;
  return std::max(1, threads);
}

}  // namespace cpu
}  // namespace imagen_fast
