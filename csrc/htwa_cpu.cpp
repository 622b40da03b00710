// HTWA on the CPU: registers the kernels of htwa_cpu_fwd.cpp and htwa_cpu_bwd.cpp (design: htwa_cpu_common.h;
// contract: csrc/HTWA_CONTRACT.md) for the `lfvila_C::` ops declared in schema.cpp.
#include <torch/library.h>

#include "htwa_cpu_common.h"

namespace lfvila {

TORCH_LIBRARY_IMPL(lfvila_C, CPU, m) {
  m.impl("htwa_fwd", &htwa_fwd_cpu);
  m.impl("htwa_bwd", &htwa_bwd_cpu);
  m.impl("htwa_bwd_packed", &htwa_bwd_packed_cpu);
}

}  // namespace lfvila
