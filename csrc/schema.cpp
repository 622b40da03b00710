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
  //   htwa_bwd_packed: the same, with dq, dk, dv returned as one (B, T, H, W, 3, heads, D) tensor (the gradient of
  //   a packed qkv projection output); CPU only.
  m.def(
      "htwa_bwd_packed(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
      "int[] window, int[] shift, int[] bias_window, float scale) -> (Tensor, Tensor)");
  // --- contrastive losses (info_nce_*) below this line ---
  // Fused InfoNCE (see lfvila_kernels/losses.py for the contract). logits z = scale * a @ b^T are never stored.
  //   a: (N, D), b: (M, D), same dtype (float16, bfloat16, float32, float64); positive of row i is column
  //   i + offset (0 <= offset, offset + N <= M); symmetric adds the column CE and needs N == M, offset == 0.
  //   returns loss () and lse_row (N,), lse_col (M,) (empty (0,) when not symmetric), all in the accumulation
  //   dtype (fp64 for fp64 inputs, else fp32). loss = mean_i(lse_row_i - z_i,i+offset) [+ mean_j(lse_col_j - z_jj)].
  m.def(
      "info_nce_fwd(Tensor a, Tensor b, float scale, int offset, bool symmetric) -> (Tensor, Tensor, Tensor)");
  //   dloss: () the upstream gradient of loss; lse_row, lse_col as returned by info_nce_fwd.
  //   returns da (N, D), db (M, D) contiguous, in a's dtype. Deterministic.
  m.def(
      "info_nce_bwd(Tensor dloss, Tensor a, Tensor b, Tensor lse_row, Tensor lse_col, float scale, int offset, "
      "bool symmetric) -> (Tensor, Tensor)");
}
