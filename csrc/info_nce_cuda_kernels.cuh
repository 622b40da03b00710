// Fused InfoNCE CUDA kernels (contract: schema.cpp, lfvila_kernels/losses.py). Launched by info_nce_cuda.cu.
//
// z_ij = scale * a_i . b_j (N x M) is never stored whole.
//   forward   row LSE: lse_partial_kernel, one block per (64 rows of X, split of the columns); it streams
//             64-column tiles of Y, computes each 64x64 z tile in registers (D in chunks of 32 through shared
//             memory) and folds it into the rows' running (max, sum of exp). The splits' partials are combined in
//             split order by lse_combine_kernel. The column LSE (symmetric) is the row LSE of z^T: the same two
//             kernels with X = b, Y = a. positive_kernel: z_{i, i+offset}. loss_kernel: one block, fixed-order
//             sums in double.
//   backward  column stripes of width S (a fixed multiple of 64): for each stripe J, grad_stripe_kernel writes
//             G_J = scale * dL/dz[:, J] (N x S, fp32) and two tiled GEMMs follow:
//             dA (fp32, N x D) += G_J @ B_J, and dB_J = G_J^T @ A (rows of J only, complete: written once).
//             Extra memory: N x S for G_J plus N x D fp32 for dA -- never N x M.
// Determinism: every output element and every partial is owned by one thread and summed in a fixed order; no
// atomics. All math in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_common.cuh"

namespace lfvila {
namespace info_nce_cuda {

using cuda_common::kThreads;
using cuda_common::to_float;

constexpr int kTile = 64;   // rows and columns of a z tile / GEMM output tile
constexpr int kChunk = 32;  // reduction chunk through shared memory

// acc[i][j] += sum_d X[r0 + ty + 16 i, d] * Y[c0 + tx + 16 j, d] over d in [0, D): one 64x64 tile of X Y^T.
// X, Y row-major with leading dimensions ldx, ldy; rows past nx / ny read as 0. Uses sx, sy (64 x 33 floats each).
// Ends with a __syncthreads (the caller may reuse sx, sy).
template <typename scalar_t>
__device__ __forceinline__ void tile_xyT(const scalar_t* X, int64_t ldx, int64_t nx, int64_t r0, const scalar_t* Y,
                                         int64_t ldy, int64_t ny, int64_t c0, int D, float* sx, float* sy,
                                         float acc[4][4]) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  for (int d0 = 0; d0 < D; d0 += kChunk) {
    for (int idx = tid; idx < kTile * kChunk; idx += kThreads) {
      const int r = idx / kChunk, dd = idx % kChunk, d = d0 + dd;
      sx[r * (kChunk + 1) + dd] = (r0 + r < nx && d < D) ? to_float(X[(r0 + r) * ldx + d]) : 0.0f;
      sy[r * (kChunk + 1) + dd] = (c0 + r < ny && d < D) ? to_float(Y[(c0 + r) * ldy + d]) : 0.0f;
    }
    __syncthreads();
    for (int dd = 0; dd < kChunk; ++dd) {
      float xv[4], yv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = sx[(ty + 16 * i) * (kChunk + 1) + dd];
#pragma unroll
      for (int j = 0; j < 4; ++j) yv[j] = sy[(tx + 16 * j) * (kChunk + 1) + dd];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * yv[j];
    }
    __syncthreads();
  }
}

// Shared memory of lse_partial_kernel and grad_stripe_kernel (static: 2 * 64*33 + 64*65 floats = 33.5 KiB).
struct TileSmem {
  float x[kTile * (kChunk + 1)];
  float y[kTile * (kChunk + 1)];
  float z[kTile * (kTile + 1)];
};

// Row LSE partials of z = scale X Y^T. Block (blockIdx.x: 64 rows, blockIdx.y: split s) covers the column tiles
// [s * tiles_per_split, min((s + 1) * tiles_per_split, ceil(ny / 64))). Writes part_m/part_l[s * nx + row].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lse_partial_kernel(const scalar_t* X, int64_t ldx, int64_t nx, const scalar_t* Y, int64_t ldy, int64_t ny, int D,
                       float scale, int tiles_per_split, float* part_m, float* part_l) {
  __shared__ TileSmem s;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = (int64_t)blockIdx.x * kTile;
  const int split = blockIdx.y;
  const int64_t ntiles = (ny + kTile - 1) / kTile;
  const int64_t t0 = (int64_t)split * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < ntiles ? t0 + tiles_per_split : ntiles;
  float m_run = -INFINITY, l_run = 0.0f;  // row r0 + tid (threads 0..63)
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * kTile;
    float acc[4][4] = {};
    tile_xyT(X, ldx, nx, r0, Y, ldy, ny, c0, D, s.x, s.y, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = tx + 16 * j;
        s.z[(ty + 16 * i) * (kTile + 1) + c] = c0 + c < ny ? acc[i][j] * scale : -INFINITY;
      }
    __syncthreads();
    if (tid < kTile) {
      const float* row = s.z + tid * (kTile + 1);
      float mx = -INFINITY;
      for (int c = 0; c < kTile; ++c) mx = fmaxf(mx, row[c]);
      const float m_new = fmaxf(m_run, mx);  // finite: every tile has a real column
      float sum = 0.0f;
      for (int c = 0; c < kTile; ++c) sum += expf(row[c] - m_new);
      l_run = l_run * expf(m_run - m_new) + sum;
      m_run = m_new;
    }
    __syncthreads();  // z is rewritten by the next tile
  }
  if (tid < kTile && r0 + tid < nx) {
    part_m[split * nx + r0 + tid] = m_run;
    part_l[split * nx + r0 + tid] = l_run;
  }
}

// lse[row] = log sum over splits (in order) of the partial (max, sum).
__global__ void __launch_bounds__(kThreads)
    lse_combine_kernel(const float* part_m, const float* part_l, int splits, int64_t nx, float* lse) {
  const int64_t r = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  if (r >= nx) return;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_m[s * nx + r]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) l += part_l[s * nx + r] * expf(part_m[s * nx + r] - m);
  lse[r] = m + logf(l);
}

// pos[i] = scale * a_i . b_{i + offset}; one block per row, fixed-order tree reduction.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) positive_kernel(const scalar_t* A, int64_t lda, const scalar_t* B,
                                                            int64_t ldb, int D, int64_t offset, float scale,
                                                            float* pos) {
  __shared__ float red[kThreads];
  const int64_t i = blockIdx.x;
  float acc = 0.0f;
  for (int d = threadIdx.x; d < D; d += kThreads) acc += to_float(A[i * lda + d]) * to_float(B[(i + offset) * ldb + d]);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) pos[i] = red[0] * scale;
}

// loss = mean_i (lse_row_i - pos_i) [+ mean_j (lse_col_j - pos_j)]: one block, double, fixed order.
__global__ void __launch_bounds__(kThreads) loss_kernel(const float* lse_row, const float* lse_col,
                                                        const float* pos, int64_t n, int64_t m, bool symmetric,
                                                        float* loss) {
  __shared__ double red[kThreads];
  double rows = 0.0, cols = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) rows += (double)lse_row[i] - (double)pos[i];
  if (symmetric)
    for (int64_t j = threadIdx.x; j < m; j += kThreads) cols += (double)lse_col[j] - (double)pos[j];
  red[threadIdx.x] = rows / (double)n + (symmetric ? cols / (double)m : 0.0);
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<float>(red[0]);
}

// G[i, jj] = scale * dL/dz_{i, j0 + jj} for rows i < n, jj < width (0 for columns past m), with
// dL/dz_ij = w_r (exp(z_ij - lse_row_i) - [j == i + offset]) + w_c (exp(z_ij - lse_col_j) - [j == i + offset]),
// w_r = dloss / n, w_c = dloss / m when symmetric else 0. grid: (ceil(n / 64), width / 64).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_stripe_kernel(const scalar_t* A, int64_t lda, int64_t n, const scalar_t* B, int64_t ldb, int64_t m, int D,
                       float scale, int64_t offset, bool symmetric, const float* dloss, const float* lse_row,
                       const float* lse_col, int64_t j0, int width, float* G) {
  __shared__ TileSmem s;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = (int64_t)blockIdx.x * kTile;
  const int64_t c0 = j0 + (int64_t)blockIdx.y * kTile;
  float acc[4][4] = {};
  tile_xyT(A, lda, n, r0, B, ldb, m, c0, D, s.x, s.y, acc);
  const float w_r = *dloss / (float)n;
  const float w_c = symmetric ? *dloss / (float)m : 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    if (r >= n) continue;
    const float lr = lse_row[r];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      float g = 0.0f;
      if (c < m) {
        const float z = acc[i][j] * scale;
        g = w_r * expf(z - lr);
        if (symmetric) g += w_c * expf(z - lse_col[c]);
        if (c == r + offset) g -= w_r + w_c;
      }
      G[r * width + (c - j0)] = g * scale;
    }
  }
}

// C (64x64 tile at blockIdx.x rows, blockIdx.y cols) = [C +] sum_k X(m, k) Y(k, n), with X(m, k) = X[m * sxm + k *
// sxk] and Y(k, n) = Y[k * ldy + n]; rows < M, cols < Ncols, k < K. fp32 accumulation in a fixed k order. C is
// float (ACCUMULATE: C += ...) or out_t (C = ...), leading dimension ldc.
template <typename x_t, typename y_t, typename out_t, bool ACCUMULATE>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const x_t* X, int64_t sxm, int64_t sxk, const y_t* Y, int64_t ldy, int64_t M, int64_t Ncols,
                int64_t K, out_t* C, int64_t ldc) {
  __shared__ float sx[kTile * (kChunk + 1)];  // [m][k]
  __shared__ float sy[kChunk * (kTile + 1)];  // [k][n]
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t m0 = (int64_t)blockIdx.x * kTile, n0 = (int64_t)blockIdx.y * kTile;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    for (int idx = tid; idx < kTile * kChunk; idx += kThreads) {
      // consecutive threads walk the unit-stride index of X for coalesced loads
      int mm, kk;
      if (sxk == 1) {
        mm = idx / kChunk;
        kk = idx % kChunk;
      } else {
        mm = idx % kTile;
        kk = idx / kTile;
      }
      const int64_t gm = m0 + mm, gk = k0 + kk;
      sx[mm * (kChunk + 1) + kk] = (gm < M && gk < K) ? to_float(X[gm * sxm + gk * sxk]) : 0.0f;
      const int yk = idx / kTile, yn = idx % kTile;
      const int64_t gyk = k0 + yk, gn = n0 + yn;
      sy[yk * (kTile + 1) + yn] = (gyk < K && gn < Ncols) ? to_float(Y[gyk * ldy + gn]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kChunk; ++kk) {
      float xv[4], yv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = sx[(ty + 16 * i) * (kChunk + 1) + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) yv[j] = sy[kk * (kTile + 1) + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * yv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn >= Ncols) continue;
      if constexpr (ACCUMULATE) {
        C[gm * ldc + gn] += acc[i][j];
      } else {
        C[gm * ldc + gn] = static_cast<out_t>(acc[i][j]);
      }
    }
  }
}

}  // namespace info_nce_cuda
}  // namespace lfvila
