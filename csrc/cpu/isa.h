// Which variant of the CPU kernels runs (csrc/cpu/isa.cpp).
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace imagen_fast {
namespace cpu {

// The active variant's entry points.
const KernelTable& active_kernels();

// "auto" (the best the CPU runs), "portable" or "avx512"; throws std::invalid_argument
// for an unknown name or a variant this module or this CPU lacks (saying which).
void set_isa(const std::string& name);

// Every variant name with "available" or why it is not.
std::vector<std::pair<std::string, std::string>> isa_status();

}  // namespace cpu
}  // namespace imagen_fast
