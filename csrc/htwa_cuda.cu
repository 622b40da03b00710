// HTWA on CUDA: launchers and registration of lfvila_C::htwa_fwd / htwa_bwd for the CUDA dispatch key.
// Kernels and their design: htwa_cuda_kernels.cuh. Contract: HTWA_CONTRACT.md.
//
// dbias memory bound: the per-chunk partials hold nchunks * heads * nwin^2 fp32 (nwin = Wt*Wh*Ww <= 480 for the
// official shapes); nchunks = min(B * boxes, kBiasChunksMax, max(1, kBiasPartialBudget / (heads * nwin^2 * 4))),
// so they take at most max(kBiasPartialBudget, heads * nwin^2 * 4 bytes), e.g. <= 256 MiB, and 29.5 MiB per chunk
// at the largest official case (nwin = 480, 32 heads). The count depends only on the shapes, so the summation
// order -- and the bits of dbias -- are the same on every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "htwa_cuda_kernels.cuh"

namespace lfvila {
namespace htwa_cuda {
namespace {

constexpr int64_t kBiasChunksMax = 64;
constexpr int64_t kBiasPartialBudget = 256ll << 20;  // bytes

using Triple = std::tuple<int, int, int>;

Triple triple(at::IntArrayRef x, const char* name) {
  TORCH_CHECK(x.size() == 3, "htwa_cuda: ", name, " must have 3 entries, got ", x.size());
  return {static_cast<int>(x[0]), static_cast<int>(x[1]), static_cast<int>(x[2])};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
                  const Geometry& g) {
  TORCH_CHECK(q.is_cuda(), "htwa_cuda: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 6, "htwa_cuda: q must be (B, T, H, W, heads, D), got ", q.sizes());
  for (const at::Tensor* x : {&k, &v}) {
    TORCH_CHECK(x->sizes() == q.sizes(), "htwa_cuda: q, k, v must have the same shape");
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "htwa_cuda: q, k, v must have the same dtype");
    TORCH_CHECK(x->device() == q.device(), "htwa_cuda: q, k, v must be on the same device");
  }
  for (const at::Tensor* x : {&q, &k, &v}) TORCH_CHECK(x->stride(5) == 1, "htwa_cuda: q/k/v need stride(-1) == 1");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "htwa_cuda: dtype must be float32, float16 or bfloat16 (float64 runs on the CPU), got ", st);
  TORCH_CHECK(q.size(5) >= 1 && q.size(5) <= 128, "htwa_cuda: head dim must be in [1, 128], got ", q.size(5));
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(g.win[a] >= 1 && g.win[a] <= g.grid[a] && g.shift[a] >= 0 && g.shift[a] < g.win[a] &&
                    g.bwin[a] >= g.win[a],
                "htwa_cuda: bad window/shift/bias_window for the grid");
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.device() == q.device(),
                "htwa_cuda: bias must be a contiguous float32 tensor on q's device");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == htwa::bias_num_rows(g) && b.size(1) == q.size(4),
                "htwa_cuda: bias must be (", htwa::bias_num_rows(g), ", ", q.size(4), "), got ", b.sizes());
  }
}

Geometry geometry(const at::Tensor& q, at::IntArrayRef window, at::IntArrayRef shift, at::IntArrayRef bias_window) {
  const auto [wt, wh, ww] = triple(window, "window");
  const auto [st, sh, sw] = triple(shift, "shift");
  const auto [bt, bh, bw] = triple(bias_window, "bias_window");
  TORCH_CHECK(q.dim() == 6, "htwa_cuda: q must be (B, T, H, W, heads, D), got ", q.sizes());
  const int grid[3] = {static_cast<int>(q.size(1)), static_cast<int>(q.size(2)), static_cast<int>(q.size(3))};
  const int win[3] = {wt, wh, ww}, sft[3] = {st, sh, sw}, bwin[3] = {bt, bh, bw};
  return htwa::make_geometry(grid, win, sft, bwin);
}

Params base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& bias, const Geometry& g, double scale) {
  Params p{};
  p.g = g;
  p.B = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(4));
  p.D = static_cast<int>(q.size(5));
  p.scale = static_cast<float>(scale);
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
  p.items = static_cast<int64_t>(p.B) * g.nbox_total;
  return p;
}

template <typename Kernel>
void launch(Kernel kernel, int64_t blocks, size_t smem, const Params& p, cudaStream_t stream) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (1ll << 31), "htwa_cuda: too many blocks (", blocks, ")");
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= props->sharedMemPerBlockOptin, "htwa_cuda: kernel needs ", smem,
              " bytes of shared memory, the device allows ", props->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f.template operator()<DMAX>() with the head-dim bucket that holds D.
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

int64_t blocks_per_box_tiles(const Params& p, int tile) {
  return static_cast<int64_t>(p.B) * p.heads * p.g.nbox_total * tiles_per_box(p.g, tile);
}

std::tuple<at::Tensor, at::Tensor> htwa_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias, at::IntArrayRef window,
                                                 at::IntArrayRef shift, at::IntArrayRef bias_window, double scale) {
  const Geometry g = geometry(q, window, shift, bias_window);
  check_inputs(q, k, v, bias, g);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(at::kFloat));
  Params p = base_params(q, k, v, bias, g, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(q.scalar_type(), "htwa_fwd_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       dispatch_dmax(p.D, [&](auto dm) {
                         launch(htwa_fwd_kernel<scalar_t, decltype(dm)::value>, blocks_per_box_tiles(p, kFwdQ),
                                FwdSmem(nullptr, p.D).bytes, p, stream);
                       });
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       dispatch_dmax(p.D, [&](auto dm) {
                         launch(htwa_fwd_kernel<scalar_t, decltype(dm)::value>, blocks_per_box_tiles(p, kFwdQ),
                                FwdSmem(nullptr, p.D).bytes, p, stream);
                       });
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       dispatch_dmax(p.D, [&](auto dm) {
                         launch(htwa_fwd_kernel<scalar_t, decltype(dm)::value>, blocks_per_box_tiles(p, kFwdQ),
                                FwdSmem(nullptr, p.D).bytes, p, stream);
                       });
                     }));
  return {out, lse};
}

// The inverse bias index (rows -> (n_q, n_k) pairs) of a (window, bias_window) on a device, built once on the
// host (htwa::build_bias_inverse) and kept for the life of the process (a few hundred KiB at most).
std::pair<at::Tensor, at::Tensor> bias_inverse(const Geometry& g, const at::Device& device) {
  using Key = std::tuple<int, int, int, int, int, int, int>;
  static std::mutex mutex;
  // deliberately leaked: device tensors must not be freed by a static destructor after CUDA shut down
  static auto* cache = new std::map<Key, std::pair<at::Tensor, at::Tensor>>();
  const Key key{device.index(), g.win[0], g.win[1], g.win[2], g.bwin[0], g.bwin[1], g.bwin[2]};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  std::vector<int32_t> offsets, pairs;
  htwa::build_bias_inverse(g, &offsets, &pairs);
  const auto cpu = at::TensorOptions().dtype(at::kInt);
  at::Tensor off = at::from_blob(offsets.data(), {static_cast<int64_t>(offsets.size())}, cpu).to(device);
  at::Tensor prs = at::from_blob(pairs.data(), {static_cast<int64_t>(pairs.size())}, cpu).to(device);
  return cache->emplace(key, std::make_pair(off, prs)).first->second;
}

int bias_chunks(const Params& p) {
  const int64_t per_chunk = static_cast<int64_t>(p.heads) * p.g.nwin * p.g.nwin * 4;
  const int64_t by_memory = std::max<int64_t>(1, kBiasPartialBudget / per_chunk);
  return static_cast<int>(std::max<int64_t>(1, std::min({p.items, kBiasChunksMax, by_memory})));
}

template <typename scalar_t>
void bwd_launch(Params& p, int64_t rows, bool with_bias, const at::Tensor& dbias, const at::Device& device,
                cudaStream_t stream) {
  {
    const int64_t blocks = std::min<int64_t>((rows + kThreads - 1) / kThreads, 1 << 16);
    if (blocks > 0) {
      htwa_delta_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  dispatch_dmax(p.D, [&](auto dm) {
    constexpr int DMAX = decltype(dm)::value;
    launch(htwa_dkdv_kernel<scalar_t, DMAX>, blocks_per_box_tiles(p, kDkvK), DkvSmem(nullptr, p.D).bytes, p, stream);
    launch(htwa_dq_kernel<scalar_t, DMAX>, blocks_per_box_tiles(p, kDqQ), DqSmem(nullptr, p.D).bytes, p, stream);
  });
  if (!with_bias) return;
  const int nchunks = bias_chunks(p);
  const int N = p.g.nwin;
  at::Tensor part = at::empty({nchunks, p.heads, N, N}, dbias.options());
  p.part = part.data_ptr<float>();
  p.nchunks = nchunks;
  const int64_t nt = (N + kBiasTile - 1) / kBiasTile;
  launch(htwa_dbias_partial_kernel<scalar_t>, static_cast<int64_t>(nchunks) * p.heads * nt * nt,
         BiasSmem(nullptr, p.D).bytes, p, stream);
  const auto [offsets, pairs] = bias_inverse(p.g, device);
  const int rows_b = htwa::bias_num_rows(p.g);
  const int64_t total = static_cast<int64_t>(rows_b) * p.heads;
  htwa_dbias_gather_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.part, offsets.data_ptr<int32_t>(), pairs.data_ptr<int32_t>(), rows_b, p.heads, N, nchunks,
      dbias.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> htwa_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
    at::IntArrayRef shift, at::IntArrayRef bias_window, double scale) {
  const Geometry g = geometry(q, window, shift, bias_window);
  check_inputs(q, k, v, bias, g);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "htwa_cuda: dout and out must match q's shape and dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 5),
              "htwa_cuda: lse must be float32 (B, T, H, W, heads)");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);
  at::Tensor dk = at::empty(q.sizes(), contiguous);
  at::Tensor dv = at::empty(q.sizes(), contiguous);
  at::Tensor delta = at::empty(q.sizes().slice(0, 5), q.options().dtype(at::kFloat));
  const bool with_bias = bias.has_value();
  at::Tensor dbias = with_bias ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, q.options().dtype(at::kFloat));

  Params p = base_params(q, k, v, bias, g, scale);
  p.dout = dout_c.data_ptr();
  p.o = out_c.data_ptr();
  p.lse_in = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t rows = delta.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(q.scalar_type(), "htwa_bwd_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       bwd_launch<scalar_t>(p, rows, with_bias, dbias, q.device(), stream);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       bwd_launch<scalar_t>(p, rows, with_bias, dbias, q.device(), stream);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       bwd_launch<scalar_t>(p, rows, with_bias, dbias, q.device(), stream);
                     }));
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace htwa_cuda
}  // namespace lfvila

TORCH_LIBRARY_IMPL(lfvila_C, CUDA, m) {
  m.impl("htwa_fwd", &lfvila::htwa_cuda::htwa_fwd_cuda);
  m.impl("htwa_bwd", &lfvila::htwa_cuda::htwa_bwd_cuda);
}
