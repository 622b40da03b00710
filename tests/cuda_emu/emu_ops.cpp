// Runs the CUDA kernels of csrc/ on the CPU through cuda_emu.h, with the same launch sequence as
// csrc/htwa_cuda.cu and csrc/info_nce_cuda.cu (grids, chunk and split counts, inverse index, stripes).
// Built by tests/test_cuda_emu.py with torch.utils.cpp_extension.load; exposes plain Python functions.
#include "cuda_emu.h"  // first: it defines the CUDA keywords the kernel headers use

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "htwa_cuda_kernels.cuh"
#include "info_nce_cuda_kernels.cuh"

namespace {

using namespace lfvila;
namespace hc = lfvila::htwa_cuda;
namespace ic = lfvila::info_nce_cuda;

template <typename F>
void dispatch_dmax(int D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

#define EMU_DISPATCH(TYPE, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, "emu", AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                      AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                                      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

htwa::Geometry geometry(const at::Tensor& q, std::vector<int64_t> w, std::vector<int64_t> s,
                        std::vector<int64_t> bw) {
  const int grid[3] = {(int)q.size(1), (int)q.size(2), (int)q.size(3)};
  const int win[3] = {(int)w[0], (int)w[1], (int)w[2]}, sft[3] = {(int)s[0], (int)s[1], (int)s[2]},
            bwin[3] = {(int)bw[0], (int)bw[1], (int)bw[2]};
  return htwa::make_geometry(grid, win, sft, bwin);
}

hc::Params base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& bias, const htwa::Geometry& g, double scale) {
  hc::Params p{};
  p.g = g;
  p.B = (int)q.size(0);
  p.heads = (int)q.size(4);
  p.D = (int)q.size(5);
  p.scale = (float)scale;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.bias_c = htwa::bias_center(g);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 5; ++i) {
    p.sq[i] = q.stride(i);
    p.sk[i] = k.stride(i);
    p.sv[i] = v.stride(i);
  }
  p.items = (int64_t)p.B * g.nbox_total;
  return p;
}

int64_t box_blocks(const hc::Params& p, int tile) {
  return (int64_t)p.B * p.heads * p.g.nbox_total * hc::tiles_per_box(p.g, tile);
}

template <typename Kernel>
void run_1d(int64_t blocks, size_t smem, Kernel body) {
  TORCH_CHECK(smem <= LFVILA_CUDA_EMULATION_SMEM, "emu: shared memory ", smem, " too large");
  emu::launch((unsigned)blocks, 1, cuda_common::kThreads, body);
}

std::vector<at::Tensor> htwa_fwd_emu(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> bias,
                                     std::vector<int64_t> window, std::vector<int64_t> shift,
                                     std::vector<int64_t> bias_window, double scale) {
  const auto g = geometry(q, window, shift, bias_window);
  at::Tensor out = at::full(q.sizes(), NAN, q.options());
  at::Tensor lse = at::full(q.sizes().slice(0, 5), NAN, q.options().dtype(at::kFloat));
  hc::Params p = base_params(q, k, v, bias, g, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  EMU_DISPATCH(q.scalar_type(), [&] {
    dispatch_dmax(p.D, [&](auto dm) {
      constexpr int DMAX = decltype(dm)::value;
      run_1d(box_blocks(p, hc::kFwdQ), hc::FwdSmem(nullptr, p.D).bytes,
             [&] { hc::htwa_fwd_kernel<scalar_t, DMAX>(p); });
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> htwa_bwd_emu(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v,
                                     std::optional<at::Tensor> bias, at::Tensor out, at::Tensor lse,
                                     std::vector<int64_t> window, std::vector<int64_t> shift,
                                     std::vector<int64_t> bias_window, double scale, int64_t nchunks) {
  const auto g = geometry(q, window, shift, bias_window);
  at::Tensor dq = at::full(q.sizes(), NAN, q.options());
  at::Tensor dk = at::full(q.sizes(), NAN, q.options());
  at::Tensor dv = at::full(q.sizes(), NAN, q.options());
  at::Tensor delta = at::full(q.sizes().slice(0, 5), NAN, q.options().dtype(at::kFloat));
  at::Tensor dbias = bias.has_value() ? at::full(bias->sizes(), NAN, bias->options()) : at::empty({0}, at::kFloat);
  hc::Params p = base_params(q, k, v, bias, g, scale);
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  p.dout = dout_c.data_ptr();
  p.o = out_c.data_ptr();
  p.lse_in = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t rows = delta.numel();
  at::Tensor part;
  EMU_DISPATCH(q.scalar_type(), [&] {
    const int64_t blocks = std::min<int64_t>((rows + cuda_common::kThreads - 1) / cuda_common::kThreads, 1 << 16);
    run_1d(blocks, 0, [&] { hc::htwa_delta_kernel<scalar_t>(p, rows); });
    dispatch_dmax(p.D, [&](auto dm) {
      constexpr int DMAX = decltype(dm)::value;
      run_1d(box_blocks(p, hc::kDkvK), hc::DkvSmem(nullptr, p.D).bytes,
             [&] { hc::htwa_dkdv_kernel<scalar_t, DMAX>(p); });
      run_1d(box_blocks(p, hc::kDqQ), hc::DqSmem(nullptr, p.D).bytes,
             [&] { hc::htwa_dq_kernel<scalar_t, DMAX>(p); });
    });
    if (!bias.has_value()) return;
    const int N = g.nwin;
    p.nchunks = (int)std::max<int64_t>(1, std::min<int64_t>(nchunks, p.items));
    part = at::full({p.nchunks, p.heads, N, N}, NAN, at::kFloat);
    p.part = part.data_ptr<float>();
    const int64_t nt = (N + hc::kBiasTile - 1) / hc::kBiasTile;
    run_1d((int64_t)p.nchunks * p.heads * nt * nt, hc::BiasSmem(nullptr, p.D).bytes,
           [&] { hc::htwa_dbias_partial_kernel<scalar_t>(p); });
    std::vector<int32_t> offsets, pairs;
    htwa::build_bias_inverse(g, &offsets, &pairs);
    const int rows_b = htwa::bias_num_rows(g);
    const int64_t total = (int64_t)rows_b * p.heads;
    run_1d((total + cuda_common::kThreads - 1) / cuda_common::kThreads, 0, [&] {
      hc::htwa_dbias_gather_kernel(p.part, offsets.data(), pairs.data(), rows_b, p.heads, N, p.nchunks,
                                   dbias.data_ptr<float>());
    });
  });
  return {dq, dk, dv, dbias};
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
at::Tensor row_lse(const at::Tensor& X, const at::Tensor& Y, float scale, int64_t max_splits) {
  const int64_t nx = X.size(0), ny = Y.size(0);
  const int D = (int)X.size(1);
  const int64_t row_tiles = cdiv(nx, ic::kTile), col_tiles = cdiv(ny, ic::kTile);
  // as info_nce_cuda.cu, with kTargetBlocks = 512 and kMaxSplits = max_splits
  int64_t splits = std::clamp<int64_t>(cdiv(512, row_tiles), 1, std::min(col_tiles, max_splits));
  const int64_t per_split = cdiv(col_tiles, splits);
  splits = cdiv(col_tiles, per_split);
  at::Tensor part_m = at::full({splits, nx}, NAN, at::kFloat), part_l = at::full({splits, nx}, NAN, at::kFloat);
  at::Tensor lse = at::full({nx}, NAN, at::kFloat);
  emu::launch((unsigned)row_tiles, (unsigned)splits, cuda_common::kThreads, [&] {
    ic::lse_partial_kernel<scalar_t>(X.data_ptr<scalar_t>(), X.stride(0), nx, Y.data_ptr<scalar_t>(), Y.stride(0),
                                     ny, D, scale, (int)per_split, part_m.data_ptr<float>(),
                                     part_l.data_ptr<float>());
  });
  emu::launch((unsigned)cdiv(nx, cuda_common::kThreads), 1, cuda_common::kThreads, [&] {
    ic::lse_combine_kernel(part_m.data_ptr<float>(), part_l.data_ptr<float>(), (int)splits, nx,
                           lse.data_ptr<float>());
  });
  return lse;
}

std::vector<at::Tensor> info_nce_fwd_emu(at::Tensor a, at::Tensor b, double scale_d, int64_t offset, bool symmetric,
                                         int64_t max_splits) {
  const int64_t N = a.size(0), M = b.size(0);
  const int D = (int)a.size(1);
  const float scale = (float)scale_d;
  at::Tensor loss = at::full({}, NAN, at::kFloat), pos = at::full({N}, NAN, at::kFloat);
  at::Tensor lse_row, lse_col = at::empty({0}, at::kFloat);
  EMU_DISPATCH(a.scalar_type(), [&] {
    lse_row = row_lse<scalar_t>(a, b, scale, max_splits);
    if (symmetric) lse_col = row_lse<scalar_t>(b, a, scale, max_splits);
    emu::launch((unsigned)N, 1, cuda_common::kThreads, [&] {
      ic::positive_kernel<scalar_t>(a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), D,
                                    offset, scale, pos.data_ptr<float>());
    });
  });
  emu::launch(1, 1, cuda_common::kThreads, [&] {
    ic::loss_kernel(lse_row.data_ptr<float>(), symmetric ? lse_col.data_ptr<float>() : nullptr,
                    pos.data_ptr<float>(), N, M, symmetric, loss.data_ptr<float>());
  });
  return {loss, lse_row, lse_col};
}

std::vector<at::Tensor> info_nce_bwd_emu(at::Tensor dloss, at::Tensor a, at::Tensor b, at::Tensor lse_row,
                                         at::Tensor lse_col, double scale_d, int64_t offset, bool symmetric,
                                         int64_t width) {
  const int64_t N = a.size(0), M = b.size(0);
  const int D = (int)a.size(1);
  const float scale = (float)scale_d;
  at::Tensor g = dloss.to(at::kFloat).reshape({1}).contiguous();
  at::Tensor da32 = at::zeros(a.sizes(), at::kFloat);
  at::Tensor db = at::full(b.sizes(), NAN, b.options());
  // width: a multiple of 64 (info_nce_cuda.cu derives it from a memory budget)
  width = std::clamp<int64_t>(width / ic::kTile * ic::kTile, ic::kTile, cdiv(M, ic::kTile) * ic::kTile);
  at::Tensor G = at::full({N, width}, NAN, at::kFloat);
  EMU_DISPATCH(a.scalar_type(), [&] {
    const scalar_t* A = a.data_ptr<scalar_t>();
    const scalar_t* B = b.data_ptr<scalar_t>();
    float* gp = G.data_ptr<float>();
    for (int64_t j0 = 0; j0 < M; j0 += width) {
      const int64_t cols = std::min(width, M - j0);
      emu::launch((unsigned)cdiv(N, ic::kTile), (unsigned)(width / ic::kTile), cuda_common::kThreads, [&] {
        ic::grad_stripe_kernel<scalar_t>(A, a.stride(0), N, B, b.stride(0), M, D, scale, offset, symmetric,
                                         g.data_ptr<float>(), lse_row.data_ptr<float>(),
                                         symmetric ? lse_col.data_ptr<float>() : nullptr, j0, (int)width, gp);
      });
      emu::launch((unsigned)cdiv(N, ic::kTile), (unsigned)cdiv(D, ic::kTile), cuda_common::kThreads, [&] {
        ic::gemm_kernel<float, scalar_t, float, true>(gp, width, 1, B + j0 * b.stride(0), b.stride(0), N, D, cols,
                                                       da32.data_ptr<float>(), D);
      });
      emu::launch((unsigned)cdiv(cols, ic::kTile), (unsigned)cdiv(D, ic::kTile), cuda_common::kThreads, [&] {
        ic::gemm_kernel<float, scalar_t, scalar_t, false>(gp, 1, width, A, a.stride(0), cols, D, N,
                                                           db.data_ptr<scalar_t>() + j0 * D, D);
      });
    }
  });
  return {da32.to(a.scalar_type()), db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("htwa_fwd", &htwa_fwd_emu);
  m.def("htwa_bwd", &htwa_bwd_emu);
  m.def("info_nce_fwd", &info_nce_fwd_emu);
  m.def("info_nce_bwd", &info_nce_bwd_emu);
}
