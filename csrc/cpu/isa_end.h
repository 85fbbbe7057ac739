// Closes the region opened by isa_begin.h (last line of a kernel source).
#if IMAGEN_FAST_ISA_AVX512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
