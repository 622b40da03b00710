// Fused InfoNCE on CUDA: launchers and registration of lfvila_C::info_nce_fwd / info_nce_bwd for the CUDA key.
// Kernels and their design: info_nce_cuda_kernels.cuh. Semantics: the schema comments in schema.cpp (the CPU
// kernel info_nce_cpu.cpp computes the same thing).
//
// Memory: forward O((N + M) * splits) for the LSE partials (splits <= 64); backward an N x S fp32 stripe of the
// gradient of the logits (S = 64 * k chosen so that the stripe stays within kStripeBudget, at least 64 columns)
// plus an N x D fp32 accumulator for da. Never N x M.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "info_nce_cuda_kernels.cuh"

namespace lfvila {
namespace info_nce_cuda {
namespace {

constexpr int64_t kTargetBlocks = 512;           // forward: split the columns until about this many blocks
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kStripeBudget = 128ll << 20;   // backward: bytes of the fp32 gradient stripe

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_inputs(const at::Tensor& a, const at::Tensor& b, int64_t offset, bool symmetric) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "info_nce_cuda: a and b must be 2-D, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "info_nce_cuda: a and b must have the same feature size");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "info_nce_cuda: a and b must have the same dtype");
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), "info_nce_cuda: a and b must be on the same CUDA device");
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "info_nce_cuda: dtype must be float32, float16 or bfloat16 (float64 runs on the CPU), got ", st);
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0 && a.size(1) > 0, "info_nce_cuda: empty input");
  TORCH_CHECK(offset >= 0 && offset + a.size(0) <= b.size(0), "info_nce_cuda: offset ", offset,
              " out of range for N=", a.size(0), " M=", b.size(0));
  TORCH_CHECK(!symmetric || (a.size(0) == b.size(0) && offset == 0),
              "info_nce_cuda: symmetric needs N == M and offset == 0");
  TORCH_CHECK(a.size(1) <= (1ll << 30), "info_nce_cuda: feature size too large");
}

// Rows must be unit-stride; any row stride is fine.
at::Tensor rows_unit_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

template <typename scalar_t>
at::Tensor row_lse(const at::Tensor& X, const at::Tensor& Y, float scale, cudaStream_t stream) {
  const int64_t nx = X.size(0), ny = Y.size(0);
  const int D = static_cast<int>(X.size(1));
  const int64_t row_tiles = cdiv(nx, kTile), col_tiles = cdiv(ny, kTile);
  int64_t splits = std::clamp<int64_t>(cdiv(kTargetBlocks, row_tiles), 1, std::min(col_tiles, kMaxSplits));
  const int64_t per_split = cdiv(col_tiles, splits);
  splits = cdiv(col_tiles, per_split);  // no empty split
  auto fopts = X.options().dtype(at::kFloat);
  at::Tensor part_m = at::empty({splits, nx}, fopts), part_l = at::empty({splits, nx}, fopts);
  at::Tensor lse = at::empty({nx}, fopts);
  TORCH_CHECK(row_tiles < (1ll << 31), "info_nce_cuda: too many rows");
  lse_partial_kernel<scalar_t><<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits)), kThreads, 0,
                                 stream>>>(X.data_ptr<scalar_t>(), X.stride(0), nx, Y.data_ptr<scalar_t>(),
                                           Y.stride(0), ny, D, scale, static_cast<int>(per_split),
                                           part_m.data_ptr<float>(), part_l.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  lse_combine_kernel<<<static_cast<unsigned>(cdiv(nx, kThreads)), kThreads, 0, stream>>>(
      part_m.data_ptr<float>(), part_l.data_ptr<float>(), static_cast<int>(splits), nx, lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                                 double scale_d, int64_t offset, bool symmetric) {
  check_inputs(a_in, b_in, offset, symmetric);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = rows_unit_stride(a_in), b = rows_unit_stride(b_in);
  const int64_t N = a.size(0), M = b.size(0);
  const int D = static_cast<int>(a.size(1));
  const float scale = static_cast<float>(scale_d);
  const auto fopts = a.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor loss = at::empty({}, fopts);
  at::Tensor pos = at::empty({N}, fopts);
  at::Tensor lse_row, lse_col = at::empty({0}, fopts);
  AT_DISPATCH_SWITCH(a.scalar_type(), "info_nce_fwd_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       lse_row = row_lse<scalar_t>(a, b, scale, stream);
                       if (symmetric) lse_col = row_lse<scalar_t>(b, a, scale, stream);
                       positive_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
                           a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), D, offset,
                           scale, pos.data_ptr<float>());
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       lse_row = row_lse<scalar_t>(a, b, scale, stream);
                       if (symmetric) lse_col = row_lse<scalar_t>(b, a, scale, stream);
                       positive_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
                           a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), D, offset,
                           scale, pos.data_ptr<float>());
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       lse_row = row_lse<scalar_t>(a, b, scale, stream);
                       if (symmetric) lse_col = row_lse<scalar_t>(b, a, scale, stream);
                       positive_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
                           a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), D, offset,
                           scale, pos.data_ptr<float>());
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  loss_kernel<<<1, kThreads, 0, stream>>>(lse_row.data_ptr<float>(), symmetric ? lse_col.data_ptr<float>() : nullptr,
                                          pos.data_ptr<float>(), N, M, symmetric, loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse_row, lse_col};
}

template <typename scalar_t>
void bwd_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& dloss, const at::Tensor& lse_row,
              const at::Tensor& lse_col, float scale, int64_t offset, bool symmetric, at::Tensor& da32,
              at::Tensor& db, cudaStream_t stream) {
  const int64_t N = a.size(0), M = b.size(0);
  const int D = static_cast<int>(a.size(1));
  // stripe width: a multiple of 64, within the budget, at least 64, at most M rounded up
  // (and at most 65535 tiles: the grid's y limit)
  const int64_t width = std::clamp<int64_t>(kStripeBudget / (N * 4) / kTile * kTile, kTile,
                                            std::min<int64_t>(cdiv(M, kTile), 65535) * kTile);
  at::Tensor G = at::empty({N, width}, a.options().dtype(at::kFloat));
  const scalar_t* A = a.data_ptr<scalar_t>();
  const scalar_t* B = b.data_ptr<scalar_t>();
  float* g = G.data_ptr<float>();
  for (int64_t j0 = 0; j0 < M; j0 += width) {
    const int64_t cols = std::min(width, M - j0);
    grad_stripe_kernel<scalar_t><<<dim3(static_cast<unsigned>(cdiv(N, kTile)), static_cast<unsigned>(width / kTile)),
                                   kThreads, 0, stream>>>(
        A, a.stride(0), N, B, b.stride(0), M, D, scale, offset, symmetric, dloss.data_ptr<float>(),
        lse_row.data_ptr<float>(), symmetric ? lse_col.data_ptr<float>() : nullptr, j0, static_cast<int>(width), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // da (N x D) += G[:, :cols] @ B[j0 : j0 + cols]
    gemm_kernel<float, scalar_t, float, true>
        <<<dim3(static_cast<unsigned>(cdiv(N, kTile)), static_cast<unsigned>(cdiv(D, kTile))), kThreads, 0, stream>>>(
            g, width, 1, B + j0 * b.stride(0), b.stride(0), N, D, cols, da32.data_ptr<float>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // db[j0 : j0 + cols] (cols x D) = G[:, :cols]^T @ A
    gemm_kernel<float, scalar_t, scalar_t, false>
        <<<dim3(static_cast<unsigned>(cdiv(cols, kTile)), static_cast<unsigned>(cdiv(D, kTile))), kThreads, 0,
           stream>>>(g, 1, width, A, a.stride(0), cols, D, N, db.data_ptr<scalar_t>() + j0 * D, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cuda(const at::Tensor& dloss, const at::Tensor& a_in,
                                                     const at::Tensor& b_in, const at::Tensor& lse_row_in,
                                                     const at::Tensor& lse_col_in, double scale_d, int64_t offset,
                                                     bool symmetric) {
  check_inputs(a_in, b_in, offset, symmetric);
  TORCH_CHECK(lse_row_in.scalar_type() == at::kFloat && lse_row_in.numel() == a_in.size(0),
              "info_nce_cuda: bad lse_row (float32, N entries expected)");
  TORCH_CHECK(!symmetric || (lse_col_in.scalar_type() == at::kFloat && lse_col_in.numel() == b_in.size(0)),
              "info_nce_cuda: bad lse_col (float32, M entries expected)");
  TORCH_CHECK(dloss.numel() == 1, "info_nce_cuda: dloss must have one element");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = rows_unit_stride(a_in), b = rows_unit_stride(b_in);
  const auto fopts = a.options().dtype(at::kFloat);
  const at::Tensor g = dloss.detach().to(fopts).reshape({1}).contiguous();  // read on the device: no host sync
  const at::Tensor lr = lse_row_in.to(a.device()).contiguous();
  const at::Tensor lc = symmetric ? lse_col_in.to(a.device()).contiguous() : lse_col_in;
  at::Tensor da32 = at::zeros(a.sizes(), fopts);
  at::Tensor db = at::empty(b.sizes(), b.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float scale = static_cast<float>(scale_d);
  AT_DISPATCH_SWITCH(a.scalar_type(), "info_nce_bwd_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       bwd_impl<scalar_t>(a, b, g, lr, lc, scale, offset, symmetric, da32, db, stream);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       bwd_impl<scalar_t>(a, b, g, lr, lc, scale, offset, symmetric, da32, db, stream);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       bwd_impl<scalar_t>(a, b, g, lr, lc, scale, offset, symmetric, da32, db, stream);
                     }));
  return {da32.to(a.scalar_type()), db};
}

}  // namespace
}  // namespace info_nce_cuda
}  // namespace lfvila

TORCH_LIBRARY_IMPL(lfvila_C, CUDA, m) {
  m.impl("info_nce_fwd", &lfvila::info_nce_cuda::info_nce_fwd_cuda);
  m.impl("info_nce_bwd", &lfvila::info_nce_cuda::info_nce_bwd_cuda);
}
