// Fused InfoNCE (LF-VILA's VPC loss, spec 3.1) on the CPU: the N x M logit matrix is never stored.
//
// logits z_ij = scale * a_i . b_j (scale = 1 / temperature); the positive of row i is column i + offset.
//   loss = (1/N) sum_i (lse_row_i - z_{i,i+offset})                           rows
//        + (1/M) sum_j (lse_col_j - z_{j,j})          when symmetric (N == M, offset == 0)
//
// Tiling. Rows and columns are split into the same number T of blocks (row blocks ~N/T, column blocks ~M/T rows
// of b, both <= kTile). Tile (I, J) is one small GEMM A_I B_J^T into a per-thread scratch buffer. The T x T
// tiles are visited in T "wavefront" steps: in step s the tiles (I, (I + s) mod T), I = 0..T-1, run in
// parallel. Within a step no two tiles share a row block or a column block, so each tile updates its rows' and
// its columns' running state (online max + sum of exp, or the gradient rows dA_I and dB_J) without locks or
// atomics, and every row and column sees its tiles in a fixed order: the result is bitwise deterministic and
// independent of the thread count.
//
// Memory: row state O(N), column state O(M), scratch O(threads * kTile^2), accumulators for dA, dB
// (O((N + M) D), the size of the gradients themselves). fp16/bf16 inputs are converted to fp32 once
// (O((N + M) D)) and accumulated in fp32; fp64 runs in fp64.
//
// Cost: forward 1 GEMM per tile, backward 3 (recompute z, dA_I += G B_J, dB_J += G^T A_I); the naive path
// needs 3 in total but streams several N x M matrices through memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// The element-wise tile loops below call exp_f32; gcc vectorises them only when FP comparisons and selects may be
// speculated, i.e. without trapping math (torch itself is built with -fno-trapping-math -fno-math-errno). This
// changes no result: it only lets the compiler evaluate both sides of a select.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

namespace {

constexpr int64_t kTile = 256;

// max defined here, after the pragma: functions compiled with different optimisation attributes (std::max from
// the headers) are not inlined into the vectorised loops, which blocks their vectorisation.
template <typename T>
inline T vmax(T x, T y) { return x > y ? x : y; }

// exp for the fp32 path, written so that gcc vectorises the loops that call it (std::exp does not vectorise
// without -ffast-math). 2^(x log2 e) = 2^n * e^r, n = round(x log2 e), |r| <= ln2/2; e^r by its Taylor series to
// degree 7 (relative error < 1e-8, below fp32 rounding). Inputs below -87 (the result underflows) give 0 and
// -inf gives 0, which the online log-sum-exp relies on.
inline float exp_f32(float x) {
  const bool tiny = x < -87.0f;
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round to nearest by the 1.5 * 2^23 trick (|x log2 e| < 2^22): no call to floor
  const float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // Cody-Waite ln2 split
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));  // a bit cast; compiles to a register move
  return tiny ? 0.0f : p * two_n;
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// The tile GEMMs must run on one thread each, whatever the caller's thread settings, or the loss and its
// gradients depend on them: torch.set_num_threads also calls mkl_set_dynamic(false), after which MKL spreads a
// GEMM issued inside our parallel region over several threads and splits its reduction dimension, changing the
// rounding. MKL's per-thread setting pins that thread's GEMMs to one thread. The symbol is weak: torch builds
// without MKL (OpenBLAS runs single-threaded inside OpenMP regions) leave it null and the guard does nothing.
// MKL_Set_Num_Threads_Local is MKL's C entry point (by value); the lower-case symbol is the Fortran one (by
// reference): mkl.h maps mkl_set_num_threads_local to the former.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

struct SequentialBlasGuard {
  int previous = 0;
  SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);  // 0 restores the global setting
  }
  SequentialBlasGuard(const SequentialBlasGuard&) = delete;
  SequentialBlasGuard& operator=(const SequentialBlasGuard&) = delete;
};

// Even split of n items into T blocks: block I is [I*n/T, (I+1)*n/T).
inline int64_t block_begin(int64_t n, int64_t T, int64_t I) { return I * n / T; }

int64_t num_blocks(int64_t N, int64_t M) {
  const int64_t big = std::max(N, M);
  return std::max<int64_t>(1, (big + kTile - 1) / kTile);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& a, const at::Tensor& b, int64_t offset, bool symmetric) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "info_nce: a and b must be 2-D, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "info_nce: a and b must have the same feature size, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "info_nce: a and b must have the same dtype");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "info_nce_cpu: a and b must be CPU tensors");
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0, "info_nce: empty batch");
  TORCH_CHECK(offset >= 0 && offset + a.size(0) <= b.size(0), "info_nce: offset ", offset,
              " out of range for N=", a.size(0), " M=", b.size(0));
  TORCH_CHECK(!symmetric || (a.size(0) == b.size(0) && offset == 0),
              "info_nce: symmetric needs N == M and offset == 0");
}

template <typename acc_t>
double sequential_sum(const acc_t* x, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]);
  return total;
}

// sum_i scale * a_i . b_{i+offset}, summed sequentially in double (deterministic).
template <typename acc_t>
double positive_logit_sum(const acc_t* A, const acc_t* B, int64_t N, int64_t D, int64_t offset, acc_t scale) {
  double total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const acc_t* x = A + i * D;
    const acc_t* y = B + (i + offset) * D;
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += x[d] * y[d];
    total += static_cast<double>(dot);
  }
  return total * static_cast<double>(scale);
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& A, const at::Tensor& B, acc_t scale,
                                                        int64_t offset, bool symmetric) {
  const int64_t N = A.size(0), M = B.size(0), D = A.size(1);
  const int64_t T = num_blocks(N, M);
  const auto opts = A.options();
  // running (max, sum of exp(z - max)) per row and per column
  at::Tensor row_m = at::full({N}, -std::numeric_limits<acc_t>::infinity(), opts);
  at::Tensor row_l = at::zeros({N}, opts);
  at::Tensor col_m = symmetric ? at::full({M}, -std::numeric_limits<acc_t>::infinity(), opts) : at::empty({0}, opts);
  at::Tensor col_l = symmetric ? at::zeros({M}, opts) : at::empty({0}, opts);
  const int64_t tr_max = (N + T - 1) / T + 1, tc_max = (M + T - 1) / T + 1;
  const int64_t threads = at::get_num_threads();
  at::Tensor scratch = at::empty({threads, tr_max * tc_max + 2 * tc_max}, opts);

  acc_t* rm = row_m.data_ptr<acc_t>();
  acc_t* rl = row_l.data_ptr<acc_t>();
  acc_t* cm = symmetric ? col_m.data_ptr<acc_t>() : nullptr;
  acc_t* cl = symmetric ? col_l.data_ptr<acc_t>() : nullptr;

  for (int64_t s = 0; s < T; ++s) {
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      const SequentialBlasGuard one_thread_gemms;
      const int64_t tid = at::get_thread_num();
      acc_t* buf = scratch[tid].data_ptr<acc_t>();
      for (int64_t I = begin; I < end; ++I) {
        const int64_t J = (I + s) % T;
        const int64_t r0 = block_begin(N, T, I), r1 = block_begin(N, T, I + 1);
        const int64_t c0 = block_begin(M, T, J), c1 = block_begin(M, T, J + 1);
        const int64_t tr = r1 - r0, tc = c1 - c0;
        if (tr == 0 || tc == 0) continue;
        at::Tensor Z = at::from_blob(buf, {tr, tc}, opts);
        at::mm_out(Z, A.narrow(0, r0, tr), B.narrow(0, c0, tc).t());
        acc_t* z = buf;
        // rows: scale in place, then fold the tile into the running max / sum
        for (int64_t i = 0; i < tr; ++i) {
          acc_t* zi = z + i * tc;
          acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < tc; ++j) {
            zi[j] *= scale;
            mx = vmax(mx, zi[j]);
          }
          const acc_t m_new = vmax(rm[r0 + i], mx);
          acc_t sum = 0;
          // lane-wise partial sums: a fixed order, so still deterministic
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < tc; ++j) sum += exp_acc(zi[j] - m_new);
          rl[r0 + i] = rl[r0 + i] * exp_acc(rm[r0 + i] - m_new) + sum;
          rm[r0 + i] = m_new;
        }
        if (symmetric) {
          // columns: vectorised across j, rows in order
          acc_t* cmax = buf + tr_max * tc_max;
          acc_t* csum = cmax + tc_max;
          for (int64_t j = 0; j < tc; ++j) {
            cmax[j] = cm[c0 + j];
            csum[j] = 0;
          }
          for (int64_t i = 0; i < tr; ++i) {
            const acc_t* zi = z + i * tc;
#pragma omp simd
            for (int64_t j = 0; j < tc; ++j) cmax[j] = vmax(cmax[j], zi[j]);
          }
          for (int64_t i = 0; i < tr; ++i) {
            const acc_t* zi = z + i * tc;
#pragma omp simd
            for (int64_t j = 0; j < tc; ++j) csum[j] += exp_acc(zi[j] - cmax[j]);
          }
          for (int64_t j = 0; j < tc; ++j) {
            cl[c0 + j] = cl[c0 + j] * exp_acc(cm[c0 + j] - cmax[j]) + csum[j];
            cm[c0 + j] = cmax[j];
          }
        }
      }
    });
  }

  at::Tensor lse_row = row_m + at::log(row_l);
  at::Tensor lse_col = symmetric ? col_m + at::log(col_l) : at::empty({0}, opts);
  // The final sums run sequentially in double: deterministic, and no precision lost for large N in fp32.
  const double pos = positive_logit_sum<acc_t>(A.data_ptr<acc_t>(), B.data_ptr<acc_t>(), N, D, offset, scale);
  double loss = (sequential_sum(lse_row.data_ptr<acc_t>(), N) - pos) / static_cast<double>(N);
  if (symmetric) loss += (sequential_sum(lse_col.data_ptr<acc_t>(), M) - pos) / static_cast<double>(M);
  return {at::scalar_tensor(loss, opts), lse_row, lse_col};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> bwd_impl(acc_t dloss, const at::Tensor& A, const at::Tensor& B,
                                            const at::Tensor& lse_row, const at::Tensor& lse_col, acc_t scale,
                                            int64_t offset, bool symmetric) {
  const int64_t N = A.size(0), M = B.size(0);
  const int64_t T = num_blocks(N, M);
  const auto opts = A.options();
  at::Tensor dA = at::zeros_like(A);
  at::Tensor dB = at::zeros_like(B);
  const int64_t tr_max = (N + T - 1) / T + 1, tc_max = (M + T - 1) / T + 1;
  const int64_t threads = at::get_num_threads();
  at::Tensor scratch = at::empty({threads, tr_max * tc_max}, opts);
  const acc_t* lr = lse_row.data_ptr<acc_t>();
  const acc_t* lc = symmetric ? lse_col.data_ptr<acc_t>() : nullptr;
  // dL/dz_ij = w_r (softmax_row_ij - y_ij) + w_c (softmax_col_ij - y_ij)
  const acc_t w_r = dloss / static_cast<acc_t>(N);
  const acc_t w_c = symmetric ? dloss / static_cast<acc_t>(M) : acc_t(0);

  for (int64_t s = 0; s < T; ++s) {
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      const SequentialBlasGuard one_thread_gemms;
      const int64_t tid = at::get_thread_num();
      acc_t* buf = scratch[tid].data_ptr<acc_t>();
      for (int64_t I = begin; I < end; ++I) {
        const int64_t J = (I + s) % T;
        const int64_t r0 = block_begin(N, T, I), r1 = block_begin(N, T, I + 1);
        const int64_t c0 = block_begin(M, T, J), c1 = block_begin(M, T, J + 1);
        const int64_t tr = r1 - r0, tc = c1 - c0;
        if (tr == 0 || tc == 0) continue;
        at::Tensor G = at::from_blob(buf, {tr, tc}, opts);
        at::Tensor A_I = A.narrow(0, r0, tr), B_J = B.narrow(0, c0, tc);
        at::mm_out(G, A_I, B_J.t());
        acc_t* g = buf;
        for (int64_t i = 0; i < tr; ++i) {
          acc_t* gi = g + i * tc;
          const acc_t lri = lr[r0 + i];
          if (symmetric) {
            const acc_t* lcj = lc + c0;
#pragma omp simd
            for (int64_t j = 0; j < tc; ++j) {
              const acc_t zij = gi[j] * scale;
              gi[j] = w_r * exp_acc(zij - lri) + w_c * exp_acc(zij - lcj[j]);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < tc; ++j) gi[j] = w_r * exp_acc(gi[j] * scale - lri);
          }
          const int64_t jpos = r0 + i + offset - c0;  // the positive column of row r0 + i, tile-local
          if (jpos >= 0 && jpos < tc) gi[jpos] -= w_r + w_c;
        }
        // dz/da_i = scale * b_j, dz/db_j = scale * a_i
        dA.narrow(0, r0, tr).addmm_(G, B_J, 1, scale);
        dB.narrow(0, c0, tc).addmm_(G.t(), A_I, 1, scale);
      }
    });
  }
  return {dA, dB};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                double scale, int64_t offset, bool symmetric) {
  check_inputs(a, b, offset, symmetric);
  const auto acc = acc_type(a.scalar_type());
  // detach: the tile GEMMs run on OpenMP worker threads, which do not inherit the caller's below-autograd
  // dispatch state, and out= ops refuse inputs that require grad
  at::Tensor A = a.detach().to(acc).contiguous(), B = b.detach().to(acc).contiguous();
  if (acc == at::kDouble) return fwd_impl<double>(A, B, scale, offset, symmetric);
  return fwd_impl<float>(A, B, static_cast<float>(scale), offset, symmetric);
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cpu(const at::Tensor& dloss, const at::Tensor& a,
                                                    const at::Tensor& b, const at::Tensor& lse_row,
                                                    const at::Tensor& lse_col, double scale, int64_t offset,
                                                    bool symmetric) {
  check_inputs(a, b, offset, symmetric);
  const auto acc = acc_type(a.scalar_type());
  TORCH_CHECK(lse_row.scalar_type() == acc && lse_row.numel() == a.size(0), "info_nce_bwd: bad lse_row");
  TORCH_CHECK(!symmetric || (lse_col.scalar_type() == acc && lse_col.numel() == b.size(0)),
              "info_nce_bwd: bad lse_col");
  at::Tensor A = a.detach().to(acc).contiguous(), B = b.detach().to(acc).contiguous();
  const double g = dloss.item<double>();
  at::Tensor lr = lse_row.detach().contiguous(), lc = lse_col.detach().contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  if (acc == at::kDouble) {
    out = bwd_impl<double>(g, A, B, lr, lc, scale, offset, symmetric);
  } else {
    out = bwd_impl<float>(static_cast<float>(g), A, B, lr, lc, static_cast<float>(scale), offset, symmetric);
  }
  return {std::get<0>(out).to(a.scalar_type()), std::get<1>(out).to(b.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lfvila_C, CPU, m) {
  m.impl("info_nce_fwd", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd", &info_nce_bwd_cpu);
}
