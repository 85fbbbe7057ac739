// Opens the code region of one variant of the CPU kernels. Every kernel source is
// compiled twice (CMakeLists.txt, add_cpu_variant): as `portable` with the module's base
// flags, and as `avx512` with this file turning on AVX-512 for every function defined
// after it. Each variant puts its code in its own namespace (IMAGEN_FAST_ISA_NS), so the
// two never share a symbol.
//
// Include this after every system and shared header the file needs, and include no
// system header after it: a template defined inside the region (std::vector, say) would
// be compiled for AVX-512 in one object and for the base ISA in the other under one
// mangled name, and the linker would keep either copy for both variants.
#pragma once

#if !defined(IMAGEN_FAST_ISA_NS) || !defined(IMAGEN_FAST_ISA_AVX512) || !defined(IMAGEN_FAST_ISA_BF16)
#error "csrc/cpu kernel sources are compiled per variant: IMAGEN_FAST_ISA_NS/_AVX512/_BF16 come from CMake"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "imagen_fast/common.h"
#include "binding.h"
#include "kernels.h"
#include "parallel.h"

#define IMAGEN_FAST_ISA_REGION 1

#if IMAGEN_FAST_ISA_AVX512
#if defined(__clang__)
#if IMAGEN_FAST_ISA_BF16
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl"))), apply_to = function)
#endif
#else
#pragma GCC push_options
#if IMAGEN_FAST_ISA_BF16
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#endif
#endif
#endif
