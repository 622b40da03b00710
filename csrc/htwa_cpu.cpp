// HTWA on the CPU: fused forward and backward (contract: csrc/HTWA_CONTRACT.md).
//
// The token grid splits into disjoint boxes (one interval per axis); inside a box every query attends every key.
// One work item is one (head, batch, box). It gathers the box's q/k/v (one head) through their strides into
// contiguous fp32 (fp64) scratch, then runs small register-blocked GEMMs (htwa_cpu_gemm.h) over blocks of query
// rows: S = (scale q) k^T + bias, an exact softmax over the whole box row (a box has at most prod(window) keys),
// out = P v. The backward recomputes P from lse (FlashAttention-2 math) and accumulates dk/dv for the box in
// scratch. Nothing of size L x L, and no rolled or partitioned copy of q/k/v, is ever made.
//
// Bias row of (query, key) = C + A(query) - A(key), with A linear in the bias_window coordinates (see BoxGeom).
// dbias is deterministic: work is split into a fixed number of chunks (independent of the thread count), each
// one head wide with its own partial sum buffer; the partials are summed in chunk order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "htwa_cpu_gemm.h"

namespace lfvila {
namespace {

using htwa_simd::VecOf;
using int64 = int64_t;

// Row-block size (query rows handled at once); a multiple of the micro-kernel height.
constexpr int64 kRowBlock = 48;
// Target number of dbias chunks per call (fixed, so the reduction order does not depend on the thread count).
constexpr int64 kBiasChunks = 64;

inline int64 round_up(int64 x, int64 m) { return (x + m - 1) / m * m; }

struct Axis {
  int64 len, win, shift, nbox;
  // Box j along this axis: [start, start + n), in-window coordinate of start = c0.
  void box(int64 j, int64& start, int64& n, int64& c0) const {
    if (shift > 0) {
      if (j == 0) {
        start = 0;
        n = shift;
        c0 = win - shift;
        return;
      }
      start = shift + (j - 1) * win;
    } else {
      start = j * win;
    }
    n = std::min(start + win, len) - start;
    c0 = 0;
  }
};

inline Axis make_axis(int64 len, int64 win, int64 shift) {
  Axis a{len, win, shift, 0};
  a.nbox = (shift > 0 ? 1 : 0) + (len - shift + win - 1) / win;
  return a;
}

// Geometry shared by every work item of a call.
struct Geom {
  int64 B, T, H, W, heads, D;
  Axis ax[3];
  int64 nbox;       // boxes per batch element
  int64 nmax;       // largest box (tokens)
  int64 win[3], bwin[3];
  int64 bias_c;     // C of the bias row formula
};

// Tokens of one box: grid coordinates and bias key A.
struct BoxTokens {
  int64 n = 0;
  std::vector<int32_t> t, h, w;
  std::vector<int64> A;
  void reserve(int64 nmax) {
    t.resize(nmax);
    h.resize(nmax);
    w.resize(nmax);
    A.resize(nmax);
  }
  void build(const Geom& g, int64 box) {
    const int64 nbh = g.ax[1].nbox, nbw = g.ax[2].nbox;
    const int64 j[3] = {box / (nbh * nbw), (box / nbw) % nbh, box % nbw};
    int64 st[3], len[3], c0[3];
    for (int a = 0; a < 3; ++a) g.ax[a].box(j[a], st[a], len[a], c0[a]);
    const int64 Wh = g.win[1], Ww = g.win[2];
    const int64 Bh = g.bwin[1], Bw = g.bwin[2];
    const int64 sb_t = (2 * Bh - 1) * (2 * Bw - 1), sb_h = 2 * Bw - 1;
    int64 i = 0;
    for (int64 a = 0; a < len[0]; ++a) {
      for (int64 b = 0; b < len[1]; ++b) {
        for (int64 c = 0; c < len[2]; ++c, ++i) {
          t[i] = static_cast<int32_t>(st[0] + a);
          h[i] = static_cast<int32_t>(st[1] + b);
          w[i] = static_cast<int32_t>(st[2] + c);
          const int64 nn = ((c0[0] + a) * Wh + (c0[1] + b)) * Ww + (c0[2] + c);
          const int64 bt = nn / (Bh * Bw), bh = (nn / Bw) % Bh, bw = nn % Bw;
          A[i] = bt * sb_t + bh * sb_h + bw;
        }
      }
    }
    n = i;
  }
};

// A strided view of a (B, T, H, W, heads, D) tensor (or (B, T, H, W, heads) for lse).
template <typename T>
struct View {
  T* p;
  int64 s[6];
  View(const at::Tensor& x) : p(const_cast<T*>(x.data_ptr<T>())) {
    for (int i = 0; i < 6; ++i) s[i] = i < x.dim() ? x.stride(i) : 0;
  }
  T* at(int64 b, int64 t, int64 h, int64 w, int64 hd) const {
    return p + b * s[0] + t * s[1] + h * s[2] + w * s[3] + hd * s[4];
  }
};

template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> mem;
  T* get(int64 n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64>(n, 1) * sizeof(T), 64));
    mem.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(mem, "htwa_cpu: out of memory for scratch (", bytes, " bytes)");
    return mem.get();
  }
};

// Softmax helpers over one row of length np (a multiple of the vector width); entries >= n are padding.
template <typename acc_t>
inline void add_bias_row(acc_t* s, const acc_t* bias_row /* bias_h + C + A[q] */, const int64* A, int64 n) {
  for (int64 j = 0; j < n; ++j) s[j] += bias_row[-A[j]];
}

// Forward row: s -> exp(s - max) in place; returns (max, sum).
template <typename acc_t>
inline void softmax_row_fwd(acc_t* s, int64 n, int64 np, acc_t& m_out, acc_t& l_out) {
  using V = typename VecOf<acc_t>::type;
  constexpr int VL = VecOf<acc_t>::L;
  for (int64 j = n; j < np; ++j) s[j] = -std::numeric_limits<acc_t>::infinity();
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64 j = 0; j < n; ++j) m = std::max(m, s[j]);
  if constexpr (std::is_same_v<acc_t, float>) {
    V vsum = htwa_simd::splat<V>(0.f);
    const V vm = htwa_simd::splat<V>(m);
    for (int64 j = 0; j < np; j += VL) {
      V x = htwa_simd::load<V>(s + j);
      V e = htwa_simd::exp_f8(x - vm);
      htwa_simd::store(s + j, e);
      vsum += e;
    }
    l_out = htwa_simd::hsum(vsum);
  } else {
    acc_t l = 0;
    for (int64 j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      l += s[j];
    }
    for (int64 j = n; j < np; ++j) s[j] = 0;
    l_out = l;
  }
  m_out = m;
}

// Backward row: p = exp(s - lse) in place (padding -> 0).
template <typename acc_t>
inline void prob_row_bwd(acc_t* s, int64 n, int64 np, acc_t lse) {
  using V = typename VecOf<acc_t>::type;
  constexpr int VL = VecOf<acc_t>::L;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64 j = n; j < np; ++j) s[j] = -std::numeric_limits<float>::infinity();
    const V vl = htwa_simd::splat<V>(lse);
    for (int64 j = 0; j < np; j += VL) htwa_simd::store(s + j, htwa_simd::exp_f8(htwa_simd::load<V>(s + j) - vl));
  } else {
    for (int64 j = 0; j < n; ++j) s[j] = std::exp(s[j] - lse);
    for (int64 j = n; j < np; ++j) s[j] = 0;
  }
}

inline Geom make_geom(const at::Tensor& q, at::IntArrayRef window, at::IntArrayRef shift,
                      at::IntArrayRef bias_window) {
  TORCH_CHECK(q.dim() == 6, "htwa: q must be (B, T, H, W, heads, D), got ", q.sizes());
  TORCH_CHECK(window.size() == 3 && shift.size() == 3 && bias_window.size() == 3,
              "htwa: window, shift and bias_window must have 3 entries");
  Geom g;
  g.B = q.size(0);
  g.T = q.size(1);
  g.H = q.size(2);
  g.W = q.size(3);
  g.heads = q.size(4);
  g.D = q.size(5);
  const int64 grid[3] = {g.T, g.H, g.W};
  g.nmax = 1;
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(window[a] >= 1 && window[a] <= grid[a], "htwa: window must be in [1, grid], got window=", window,
                " grid=", at::IntArrayRef(grid, 3));
    TORCH_CHECK(shift[a] >= 0 && shift[a] < window[a], "htwa: shift must be in [0, window), got shift=", shift);
    TORCH_CHECK(bias_window[a] >= window[a], "htwa: bias_window must be >= window, got ", bias_window);
    g.ax[a] = make_axis(grid[a], window[a], shift[a]);
    g.win[a] = window[a];
    g.bwin[a] = bias_window[a];
    g.nmax *= window[a];
  }
  TORCH_CHECK(g.nmax <= (int64(1) << 24), "htwa: window too large for the CPU kernel");
  g.nbox = g.ax[0].nbox * g.ax[1].nbox * g.ax[2].nbox;
  const int64 Bt = g.bwin[0], Bh = g.bwin[1], Bw = g.bwin[2];
  g.bias_c = ((Bt - 1) * (2 * Bh - 1) + (Bh - 1)) * (2 * Bw - 1) + (Bw - 1);
  return g;
}

inline int64 num_bias_rows(const Geom& g) {
  return (2 * g.bwin[0] - 1) * (2 * g.bwin[1] - 1) * (2 * g.bwin[2] - 1);
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor last_dim_contig(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias, const Geom& g) {
  for (const at::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu(), "htwa_cpu: tensors must be on the CPU");
    TORCH_CHECK(x->sizes() == q.sizes(), "htwa: q, k, v must have the same shape");
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "htwa: q, k, v must have the same dtype");
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "htwa: q must be floating point, got ", q.scalar_type());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "htwa_cpu: bias must be on the CPU");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == num_bias_rows(g) && b.size(1) == g.heads, "htwa: bias must be (",
                num_bias_rows(g), ", ", g.heads, "), got ", b.sizes());
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), "htwa: bias must be floating point");
  }
}

// ----------------------------------------------------------------------------------------------------------------
// forward

template <typename scalar_t, typename acc_t>
void fwd_impl(const Geom& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_t* biasT,
              int64 nbias, acc_t scale, at::Tensor& out, at::Tensor& lse) {
  constexpr int VL = VecOf<acc_t>::L;
  const View<scalar_t> Q(q), K(k), Vv(v), O(out);
  const View<acc_t> LSE(lse);
  const int64 D = g.D, Dp = round_up(D, VL), NP = round_up(g.nmax, VL);
  const int64 R = std::min(kRowBlock, g.nmax);
  const int64 items_per_head = g.B * g.nbox;
  const int64 nitems = g.heads * items_per_head;

  at::parallel_for(0, nitems, 1, [&](int64 begin, int64 end) {
    BoxTokens bt;
    bt.reserve(g.nmax);
    Scratch<acc_t> mem;
    acc_t* base = mem.get(g.nmax * Dp /*Qs*/ + Dp * NP /*Kt*/ + g.nmax * Dp /*V*/ + R * NP /*S*/ + R * Dp /*O*/ +
                          2 * R /*m, inv*/);
    acc_t* Qs = base;
    acc_t* Kt = Qs + g.nmax * Dp;
    acc_t* Vs = Kt + Dp * NP;
    acc_t* S = Vs + g.nmax * Dp;
    acc_t* Ob = S + R * NP;
    acc_t* inv = Ob + R * Dp;
    int64 last_box = -1;
    for (int64 it = begin; it < end; ++it) {
      const int64 hd = it / items_per_head, bb = it % items_per_head;
      const int64 b = bb / g.nbox, box = bb % g.nbox;
      if (box != last_box) {
        bt.build(g, box);
        last_box = box;
      }
      const int64 n = bt.n, np = round_up(n, VL);
      // gather
      for (int64 i = 0; i < n; ++i) {
        const scalar_t* qp = Q.at(b, bt.t[i], bt.h[i], bt.w[i], hd);
        const scalar_t* kp = K.at(b, bt.t[i], bt.h[i], bt.w[i], hd);
        const scalar_t* vp = Vv.at(b, bt.t[i], bt.h[i], bt.w[i], hd);
        acc_t* qs = Qs + i * Dp;
        acc_t* vs = Vs + i * Dp;
        for (int64 d = 0; d < D; ++d) {
          qs[d] = scale * static_cast<acc_t>(qp[d]);
          vs[d] = static_cast<acc_t>(vp[d]);
          Kt[d * np + i] = static_cast<acc_t>(kp[d]);
        }
        for (int64 d = D; d < Dp; ++d) qs[d] = vs[d] = 0;
      }
      for (int64 d = 0; d < D; ++d)
        for (int64 i = n; i < np; ++i) Kt[d * np + i] = 0;
      const acc_t* bias_h = biasT ? biasT + hd * nbias + g.bias_c : nullptr;

      for (int64 r0 = 0; r0 < n; r0 += R) {
        const int64 rb = std::min(R, n - r0);
        htwa_simd::gemm<acc_t, false>(rb, np, D, Qs + r0 * Dp, Dp, 1, Kt, np, S, np);
        for (int64 i = 0; i < rb; ++i) {
          acc_t* s = S + i * np;
          if (bias_h) add_bias_row(s, bias_h + bt.A[r0 + i], bt.A.data(), n);
          acc_t m, l;
          softmax_row_fwd(s, n, np, m, l);
          inv[i] = acc_t(1) / l;
          *LSE.at(b, bt.t[r0 + i], bt.h[r0 + i], bt.w[r0 + i], hd) = m + std::log(l);
        }
        htwa_simd::gemm<acc_t, false>(rb, Dp, n, S, np, 1, Vs, Dp, Ob, Dp);
        for (int64 i = 0; i < rb; ++i) {
          const int64 r = r0 + i;
          scalar_t* op = O.at(b, bt.t[r], bt.h[r], bt.w[r], hd);
          const acc_t* o = Ob + i * Dp;
          const acc_t c = inv[i];
          for (int64 d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(o[d] * c);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> htwa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
                                                at::IntArrayRef window, at::IntArrayRef shift,
                                                at::IntArrayRef bias_window, double scale) {
  const Geom g = make_geom(q_in, window, shift, bias_window);
  check_inputs(q_in, k_in, v_in, bias, g);
  const at::Tensor q = last_dim_contig(q_in), k = last_dim_contig(k_in), v = last_dim_contig(v_in);
  const auto acc = acc_type_of(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.B, g.T, g.H, g.W, g.heads}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  const int64 nbias = num_bias_rows(g);
  at::Tensor biasT;
  if (bias.has_value()) biasT = bias->to(acc).t().contiguous();  // (heads, nbias)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "htwa_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(g, q, k, v, biasT.defined() ? biasT.data_ptr<acc_t>() : nullptr, nbias,
                              static_cast<acc_t>(scale), out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------------------------------------
// backward

template <typename scalar_t, typename acc_t>
void bwd_impl(const Geom& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const acc_t* biasT, int64 nbias, const at::Tensor& out, const at::Tensor& lse, acc_t scale,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, acc_t* partials, int64 parts_per_head) {
  constexpr int VL = VecOf<acc_t>::L;
  const View<scalar_t> Q(q), K(k), Vv(v), dO(dout), O(out), dQ(dq), dK(dk), dV(dv);
  const View<acc_t> LSE(lse);
  const int64 D = g.D, Dp = round_up(D, VL), NP = round_up(g.nmax, VL);
  const int64 R = std::min(kRowBlock, g.nmax);
  const int64 items_per_head = g.B * g.nbox;
  const int64 nchunks = g.heads * parts_per_head;

  at::parallel_for(0, nchunks, 1, [&](int64 cbegin, int64 cend) {
    BoxTokens bt;
    bt.reserve(g.nmax);
    Scratch<acc_t> mem;
    const int64 nm = g.nmax;
    acc_t* base = mem.get(5 * nm * Dp /*Qs K dO dK dV*/ + 2 * Dp * NP /*Kt Vt*/ + 2 * nm /*lse delta*/ +
                          2 * R * NP /*S dP*/ + R * Dp /*dQ*/);
    acc_t* Qs = base;
    acc_t* Ks = Qs + nm * Dp;
    acc_t* dOs = Ks + nm * Dp;
    acc_t* dKs = dOs + nm * Dp;
    acc_t* dVs = dKs + nm * Dp;
    acc_t* Kt = dVs + nm * Dp;
    acc_t* Vt = Kt + Dp * NP;
    acc_t* lses = Vt + Dp * NP;
    acc_t* delta = lses + nm;
    acc_t* S = delta + nm;
    acc_t* dP = S + R * NP;
    acc_t* dQb = dP + R * NP;
    int64 last_box = -1;

    for (int64 c = cbegin; c < cend; ++c) {
      const int64 hd = c / parts_per_head, part = c % parts_per_head;
      const int64 ib = part * items_per_head / parts_per_head;
      const int64 ie = (part + 1) * items_per_head / parts_per_head;
      acc_t* pbias = nullptr;
      if (biasT) {
        pbias = partials + c * nbias;
        std::fill(pbias, pbias + nbias, acc_t(0));
      }
      const acc_t* bias_h = biasT ? biasT + hd * nbias + g.bias_c : nullptr;
      acc_t* pbias_c = pbias ? pbias + g.bias_c : nullptr;

      for (int64 bb = ib; bb < ie; ++bb) {
        const int64 b = bb / g.nbox, box = bb % g.nbox;
        if (box != last_box) {
          bt.build(g, box);
          last_box = box;
        }
        const int64 n = bt.n, np = round_up(n, VL);
        for (int64 i = 0; i < n; ++i) {
          const int64 t = bt.t[i], h = bt.h[i], w = bt.w[i];
          const scalar_t* qp = Q.at(b, t, h, w, hd);
          const scalar_t* kp = K.at(b, t, h, w, hd);
          const scalar_t* vp = Vv.at(b, t, h, w, hd);
          const scalar_t* dop = dO.at(b, t, h, w, hd);
          const scalar_t* op = O.at(b, t, h, w, hd);
          acc_t* qs = Qs + i * Dp;
          acc_t* ks = Ks + i * Dp;
          acc_t* dos = dOs + i * Dp;
          acc_t dl = 0;
          for (int64 d = 0; d < D; ++d) {
            const acc_t kd = static_cast<acc_t>(kp[d]);
            const acc_t dod = static_cast<acc_t>(dop[d]);
            qs[d] = scale * static_cast<acc_t>(qp[d]);
            ks[d] = kd;
            dos[d] = dod;
            Kt[d * np + i] = kd;
            Vt[d * np + i] = static_cast<acc_t>(vp[d]);
            dl += dod * static_cast<acc_t>(op[d]);
          }
          for (int64 d = D; d < Dp; ++d) qs[d] = ks[d] = dos[d] = 0;
          delta[i] = dl;
          lses[i] = *LSE.at(b, t, h, w, hd);
        }
        for (int64 d = 0; d < D; ++d) {
          for (int64 i = n; i < np; ++i) Kt[d * np + i] = Vt[d * np + i] = 0;
        }
        std::fill(dKs, dKs + n * Dp, acc_t(0));
        std::fill(dVs, dVs + n * Dp, acc_t(0));

        for (int64 r0 = 0; r0 < n; r0 += R) {
          const int64 rb = std::min(R, n - r0);
          htwa_simd::gemm<acc_t, false>(rb, np, D, Qs + r0 * Dp, Dp, 1, Kt, np, S, np);
          htwa_simd::gemm<acc_t, false>(rb, np, D, dOs + r0 * Dp, Dp, 1, Vt, np, dP, np);
          for (int64 i = 0; i < rb; ++i) {
            const int64 r = r0 + i;
            acc_t* s = S + i * np;
            acc_t* dp = dP + i * np;
            if (bias_h) add_bias_row(s, bias_h + bt.A[r], bt.A.data(), n);
            prob_row_bwd(s, n, np, lses[r]);
            const acc_t dr = delta[r];
            for (int64 j = 0; j < np; ++j) dp[j] = s[j] * (dp[j] - dr);
            if (pbias_c) {
              acc_t* prow = pbias_c + bt.A[r];
              const int64* A = bt.A.data();
              for (int64 j = 0; j < n; ++j) prow[-A[j]] += dp[j];
            }
          }
          // dQ = dS K ; dV += P^T dO ; dK += dS^T (scale q)
          htwa_simd::gemm<acc_t, false>(rb, Dp, n, dP, np, 1, Ks, Dp, dQb, Dp);
          htwa_simd::gemm<acc_t, true>(n, Dp, rb, S, 1, np, dOs + r0 * Dp, Dp, dVs, Dp);
          htwa_simd::gemm<acc_t, true>(n, Dp, rb, dP, 1, np, Qs + r0 * Dp, Dp, dKs, Dp);
          for (int64 i = 0; i < rb; ++i) {
            const int64 r = r0 + i;
            scalar_t* p = dQ.at(b, bt.t[r], bt.h[r], bt.w[r], hd);
            const acc_t* x = dQb + i * Dp;
            for (int64 d = 0; d < D; ++d) p[d] = static_cast<scalar_t>(scale * x[d]);
          }
        }
        for (int64 i = 0; i < n; ++i) {
          scalar_t* pk = dK.at(b, bt.t[i], bt.h[i], bt.w[i], hd);
          scalar_t* pv = dV.at(b, bt.t[i], bt.h[i], bt.w[i], hd);
          const acc_t* xk = dKs + i * Dp;
          const acc_t* xv = dVs + i * Dp;
          for (int64 d = 0; d < D; ++d) {
            pk[d] = static_cast<scalar_t>(xk[d]);
            pv[d] = static_cast<scalar_t>(xv[d]);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> htwa_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window, at::IntArrayRef shift, at::IntArrayRef bias_window, double scale) {
  const Geom g = make_geom(q_in, window, shift, bias_window);
  check_inputs(q_in, k_in, v_in, bias, g);
  for (const at::Tensor* x : {&dout_in, &out_in}) {
    TORCH_CHECK(x->device().is_cpu(), "htwa_cpu: tensors must be on the CPU");
    TORCH_CHECK(x->sizes() == q_in.sizes(), "htwa_bwd: dout and out must have q's shape");
    TORCH_CHECK(x->scalar_type() == q_in.scalar_type(), "htwa_bwd: dout and out must have q's dtype");
  }
  const auto acc = acc_type_of(q_in.scalar_type());
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.dim() == 5 && lse_in.sizes() == q_in.sizes().slice(0, 5),
              "htwa_bwd: lse must be (B, T, H, W, heads), got ", lse_in.sizes());
  const at::Tensor q = last_dim_contig(q_in), k = last_dim_contig(k_in), v = last_dim_contig(v_in);
  const at::Tensor dout = last_dim_contig(dout_in), out = last_dim_contig(out_in);
  const at::Tensor lse = lse_in.to(acc);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  const int64 nbias = num_bias_rows(g);
  at::Tensor dbias = bias.has_value() ? at::zeros({nbias, g.heads}, q.options().dtype(acc))
                                      : at::empty({0}, q.options().dtype(acc));
  if (q.numel() == 0) {
    if (bias.has_value()) dbias = dbias.to(bias->scalar_type());
    return {dq, dk, dv, dbias};
  }
  at::Tensor biasT, partials;
  const int64 items_per_head = g.B * g.nbox;
  const int64 parts_per_head =
      std::max<int64>(1, std::min<int64>(items_per_head, (kBiasChunks + g.heads - 1) / g.heads));
  if (bias.has_value()) {
    biasT = bias->to(acc).t().contiguous();
    partials = at::empty({g.heads * parts_per_head, nbias}, q.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "htwa_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, acc_t>(g, dout, q, k, v, biasT.defined() ? biasT.data_ptr<acc_t>() : nullptr, nbias, out,
                              lse, static_cast<acc_t>(scale), dq, dk, dv,
                              partials.defined() ? partials.data_ptr<acc_t>() : nullptr, parts_per_head);
    if (partials.defined()) {
      // ordered reduction: dbias[r, h] = sum_p partials[h * parts + p, r], p ascending
      const acc_t* P = partials.data_ptr<acc_t>();
      acc_t* db = dbias.data_ptr<acc_t>();
      const int64 heads = g.heads;
      at::parallel_for(0, heads, 1, [&](int64 hb, int64 he) {
        for (int64 h = hb; h < he; ++h) {
          for (int64 r = 0; r < nbias; ++r) {
            acc_t s = 0;
            for (int64 p = 0; p < parts_per_head; ++p) s += P[(h * parts_per_head + p) * nbias + r];
            db[r * heads + h] = s;
          }
        }
      });
    }
  });
  if (bias.has_value() && bias->scalar_type() != acc) dbias = dbias.to(bias->scalar_type());
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lfvila_C, CPU, m) {
  m.impl("htwa_fwd", &htwa_fwd_cpu);
  m.impl("htwa_bwd", &htwa_bwd_cpu);
}

}  // namespace lfvila
