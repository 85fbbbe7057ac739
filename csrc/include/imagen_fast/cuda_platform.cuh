// The CUDA headers the kernels need, or (IMAGEN_FAST_CUDA_EMULATION, CPU tests only)
// the host emulation of that subset in cuda_emulation.h.
#pragma once

#ifdef IMAGEN_FAST_CUDA_EMULATION
#include "imagen_fast/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
