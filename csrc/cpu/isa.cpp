// The run-time choice between the variants of the CPU kernels: "portable" (always
// built, the module's base flags) and "avx512" (x86-64, when built). The default is the
// best one this CPU runs; imagen_fast.ops._cpu_backend applies IMAGEN_FAST_CPU_ISA.
#include "isa.h"

#include <atomic>
#include <stdexcept>

namespace imagen_fast {
namespace cpu {
namespace {

// Why this CPU cannot run the AVX-512 variant ("" when it can).
std::string avx512_missing() {
#ifdef IMAGEN_FAST_HAS_AVX512
  __builtin_cpu_init();
  std::string miss;
  auto need = [&](bool ok, const char* name) {
    if (!ok) miss += (miss.empty() ? "" : ", ") + std::string(name);
  };
  need(__builtin_cpu_supports("avx2"), "avx2");
  need(__builtin_cpu_supports("fma"), "fma");
  need(__builtin_cpu_supports("avx512f"), "avx512f");
  need(__builtin_cpu_supports("avx512bw"), "avx512bw");
  need(__builtin_cpu_supports("avx512dq"), "avx512dq");
  need(__builtin_cpu_supports("avx512vl"), "avx512vl");
  if (std::string(avx512::kernel_table().isa).find("avx512bf16") != std::string::npos)
    need(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  return miss.empty() ? "" : "this CPU lacks " + miss;
#else
  return "not built (not x86-64, IMAGEN_FAST_AVX512=OFF, or the compiler cannot target AVX-512)";
#endif
}

const KernelTable* table_of(const std::string& name) {
#ifdef IMAGEN_FAST_HAS_AVX512
  if (name == "avx512") return &avx512::kernel_table();
#endif
  if (name == "portable") return &portable::kernel_table();
  return nullptr;
}

const KernelTable* best() {
  static const KernelTable* b = avx512_missing().empty() ? table_of("avx512") : &portable::kernel_table();
  return b;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_relaxed);
  return t ? *t : *best();
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_active.store(best());
    return;
  }
  if (name != "portable" && name != "avx512")
    throw std::invalid_argument("IMAGEN_FAST_CPU_ISA must be auto, portable or avx512, got '" + name + "'");
  if (name == "avx512") {
    const std::string why = avx512_missing();
    if (!why.empty()) throw std::invalid_argument("IMAGEN_FAST_CPU_ISA=avx512 cannot run: " + why);
  }
  g_active.store(table_of(name));
}

std::vector<std::pair<std::string, std::string>> isa_status() {
  const std::string why = avx512_missing();
  return {{"portable", "available"}, {"avx512", why.empty() ? "available" : why}};
}

}  // namespace cpu
}  // namespace imagen_fast
