// One place for the schemas of every compiled operator. Kernels register implementations per device in their
// own files (htwa_cpu.cpp, htwa_cuda.cu, info_nce_cpu.cpp, ...). The public, documented ops are the
// `lfvila::` custom ops in lfvila_kernels/; these `lfvila_C::` entry points are their compiled backends.
#include <torch/library.h>

TORCH_LIBRARY(lfvila_C, m) {
  // Hierarchical temporal window attention (see lfvila_kernels/htwa.py for the contract).
  //   q, k, v: (B, T, H, W, heads, D), any strides with stride(-1) == 1; same dtype.
  //   bias: (nbias, heads) fp32 (fp64 when q is fp64) or None; nbias = (2Bt-1)(2Bh-1)(2Bw-1).
  //   returns out (B, T, H, W, heads, D) contiguous, dtype of q; lse (B, T, H, W, heads) fp32 (fp64 for fp64 q).
  m.def(
      "htwa_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, int[] window, int[] shift, int[] bias_window, "
      "float scale) -> (Tensor, Tensor)");
  //   dout, out: contiguous (B, T, H, W, heads, D); lse as returned by htwa_fwd.
  //   returns dq, dk, dv contiguous (B, T, H, W, heads, D) in q's dtype, and dbias (nbias, heads) in bias's
  //   dtype (an empty tensor when bias is None). dbias is deterministic.
  m.def(
      "htwa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, int[] window, "
      "int[] shift, int[] bias_window, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // --- contrastive losses (info_nce_*) below this line ---
}
