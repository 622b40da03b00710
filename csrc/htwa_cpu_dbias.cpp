// HTWA on the CPU, the dbias reduction: the backward's chunks (htwa_cpu_bwd.cpp) each leave their own partial sums,
// one head-group wide, in a fixed number of chunks independent of the thread count; summing them here in chunk
// order makes dbias bitwise deterministic. Rows are kept reversed (RevBias in htwa_cpu_common.h): entry r of a
// partial row sits at nbias - 1 - r.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "htwa_cpu_common.h"

namespace lfvila {
namespace {

template <typename acc_t>
void reduce_dbias(const acc_t* P, int64_t hg, int64_t parts, int64_t stride, acc_t* db, int64_t nbias,
                  int64_t heads) {
  at::parallel_for(0, heads, 1, [&](int64_t hb, int64_t he) {
    for (int64_t hd = hb; hd < he; ++hd) {
      const int64_t grp = hd / hg, hh = hd % hg;
      for (int64_t r = 0; r < nbias; ++r) {
        acc_t s = 0;
        for (int64_t p = 0; p < parts; ++p) s += P[((grp * parts + p) * hg + hh) * stride + nbias - 1 - r];
        db[r * heads + hd] = s;
      }
    }
  });
}

}  // namespace

void htwa_reduce_dbias_cpu(const at::Tensor& partials, int64_t hg, int64_t parts, int64_t stride, at::Tensor& dbias) {
  TORCH_CHECK(partials.scalar_type() == dbias.scalar_type() && dbias.dim() == 2 && dbias.is_contiguous(),
              "htwa_reduce_dbias_cpu: dbias must be a contiguous (nbias, heads) tensor of the partials' dtype");
  AT_DISPATCH_FLOATING_TYPES(dbias.scalar_type(), "htwa_reduce_dbias_cpu", [&] {
    reduce_dbias<scalar_t>(partials.data_ptr<scalar_t>(), hg, parts, stride, dbias.data_ptr<scalar_t>(),
                           dbias.size(0), dbias.size(1));
  });
}

}  // namespace lfvila
