// Private header of the HTWA CPU kernels (htwa_cpu_fwd.cpp, htwa_cpu_bwd.cpp, htwa_cpu_dbias.cpp; registered in
// htwa_cpu.cpp): the geometry of a call, the gathers of box rows, the row helpers and the per-class bias blocks.
//
// The token grid splits into disjoint boxes (one interval per axis); inside a box every query attends every key.
// A work item is one (head group, batch, box): it gathers the box's q/k/v rows of hg heads through their strides
// into contiguous fp32 (fp64) scratch (a token's heads are adjacent in a qkv projection, so this is a few long
// reads), then per head runs small register-blocked GEMMs (htwa_cpu_gemm.h) over blocks of query rows:
// S = (scale q) k^T + bias, an exact softmax over the whole box row (a box has at most prod(window) keys),
// out = P v. The backward recomputes P from lse (FlashAttention-2 math) and accumulates dk/dv of the box in
// scratch. Nothing of size L x L, and no rolled or partitioned copy of q/k/v, is ever made.
//
// Bias row of (query, key) = C + A(query) - A(key), with A linear in the bias_window coordinates (BoxTokens).
// Boxes come in at most 27 shapes ("classes": per axis a front partial box, full boxes, a ragged end box) and
// the bias of a box depends on its class only, so boxes are visited class by class: for boxes up to 256 KiB a
// head (layers 0-4) the class's dense bias block is built once and added with vector loads; for boxes up to
// 64 KiB (layers 0-2) dbias is also accumulated densely per class and scattered into the table once per class
// run. The bias table is also kept reversed (RevBias), where a w-run of keys has its bias values adjacent: larger
// boxes build their bias rows from it, and dS rows (or the dense sums) go into dbias through it, 8 floats at a
// time. While an item computes, the next item's rows are prefetched (PrefetchPlan).
// dbias is deterministic: the work is split into a fixed number of chunks (independent of the thread count),
// each one head group wide with its own partial sums; the partials are summed in chunk order afterwards.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

// Copy loops stay inline: the default turns short row copies into memmove calls.
#pragma GCC optimize("no-tree-loop-distribute-patterns")

#include "htwa_cpu_gemm.h"
#include "htwa_geometry.h"

namespace lfvila {
namespace {

using htwa_simd::VecOf;
using int64 = int64_t;

// Row-block size (query rows handled at once); a multiple of the micro-kernel height.
constexpr int64 kRowBlock = 48;
// Target number of dbias chunks per call (fixed, so the reduction order does not depend on the thread count).
constexpr int64 kBiasChunks = 64;

inline int64 round_up(int64 x, int64 m) { return (x + m - 1) / m * m; }

// One axis of the grid; the box split itself is htwa::axis_box / htwa::axis_num_boxes (htwa_geometry.h).
struct Axis {
  int64 len, win, shift, nbox;
  // Box j along this axis: [start, start + n), in-window coordinate of start = c0.
  void box(int64 j, int64& start, int64& n, int64& c0) const {
    int st, len_j, c0_j;
    htwa::axis_box(static_cast<int>(len), static_cast<int>(win), static_cast<int>(shift), static_cast<int>(j), &st,
                   &len_j, &c0_j);
    start = st;
    n = len_j;
    c0 = c0_j;
  }
  // 0: front partial box, 1: full box, 2: ragged end box
  int cls(int64 j) const {
    if (shift > 0 && j == 0) return 0;
    int64 st, n, c0;
    box(j, st, n, c0);
    return n == win ? 1 : 2;
  }
};

inline Axis make_axis(int64 len, int64 win, int64 shift) {
  Axis a{len, win, shift, 0};
  a.nbox = htwa::axis_num_boxes(static_cast<int>(len), static_cast<int>(win), static_cast<int>(shift));
  return a;
}

// Geometry shared by every work item of a call.
struct Geom {
  int64 B, T, H, W, heads, D;
  Axis ax[3];
  int64 nbox;       // boxes per batch element
  int64 nmax;       // largest box (tokens)
  int64 win[3], bwin[3];
  htwa::Geometry hg;  // the same geometry in htwa_geometry.h's terms (bias keys, rows)
  int64 bias_c;       // C of the bias row formula
  // Visiting order: boxes sorted by class (stable); item bb -> box order[bb / B], batch bb % B.
  std::vector<int64> order;
  std::vector<int32_t> cls;  // class id of order[i]
};

// Tokens of one box: grid coordinates and bias key A.
struct BoxTokens {
  int64 n = 0;
  std::vector<int32_t> t, h, w;
  std::vector<int32_t> A;
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
    int64 i = 0;
    for (int64 a = 0; a < len[0]; ++a) {
      for (int64 b = 0; b < len[1]; ++b) {
        for (int64 c = 0; c < len[2]; ++c, ++i) {
          t[i] = static_cast<int32_t>(st[0] + a);
          h[i] = static_cast<int32_t>(st[1] + b);
          w[i] = static_cast<int32_t>(st[2] + c);
          const int64 nn = ((c0[0] + a) * Wh + (c0[1] + b)) * Ww + (c0[2] + c);
          A[i] = static_cast<int32_t>(htwa::bias_key(g.hg, static_cast<int>(nn)));
        }
      }
    }
    n = i;
    // runs: maximal stretches of keys whose A grows by 1 (a w-row of the box), cut into pieces of at most 8
    rj0.clear();
    ra0.clear();
    rlen.clear();
    for (int64 jj = 0; jj < n; ++jj) {
      if (jj > 0 && A[jj] == A[jj - 1] + 1 && rlen.back() < 8) {
        ++rlen.back();
      } else {
        rj0.push_back(static_cast<int32_t>(jj));
        ra0.push_back(A[jj]);
        rlen.push_back(1);
      }
    }
    spaced = true;
    for (size_t r = 1; r < ra0.size(); ++r) spaced = spaced && ra0[r] - ra0[r - 1] >= 8;
  }
  // Runs of keys with consecutive bias positions: key j0 + c (c < len) sits at A = a0 + c. With a reversed bias
  // table a run's bias values are 8 adjacent floats, so a bias row is built with 8-wide copies and a dS row
  // scattered into dbias with 8-wide read-modify-writes instead of one element at a time. `spaced`: every two runs'
  // starts are at least 8 apart in A, so the 8-wide windows of one row never overlap (true when the bias
  // window's w extent is at least 5: rows of A are 2 * Bw - 1 apart).
  std::vector<int32_t> rj0, ra0, rlen;
  bool spaced = false;
};

// A reversed bias table: R[hd * stride + m] = bias[nbias - 1 - m, hd] for m < nbias, then 8 zeros (the overhang of
// the last 8-wide run copy). For query q the value of key k is at R + hd * stride + base - A[q] + A[k] with
// base = nbias - 1 - C, increasing along a run. dbias partials use the same layout.
struct RevBias {
  int64 stride = 0, base = 0;
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

// dst[0..Dp) = (mul *) src[0..D) in acc_t, zero padded.
template <typename scalar_t, typename acc_t, bool MUL>
inline void load_row_impl(acc_t* __restrict dst, const scalar_t* __restrict src, int64 D, int64 Dp, acc_t mul) {
  int64 d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = typename VecOf<acc_t>::type;
    constexpr int VL = VecOf<acc_t>::L;
    for (; d + VL <= D; d += VL) {
      V x = htwa_simd::load<V>(src + d);
      if constexpr (MUL) x = x * mul;
      htwa_simd::store(dst + d, x);
    }
  }
  for (; d < D; ++d) dst[d] = MUL ? mul * static_cast<acc_t>(src[d]) : static_cast<acc_t>(src[d]);
  for (; d < Dp; ++d) dst[d] = 0;
}
template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64 D, int64 Dp, acc_t mul) {
  load_row_impl<scalar_t, acc_t, true>(dst, src, D, Dp, mul);
}
template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64 D, int64 Dp) {
  load_row_impl<scalar_t, acc_t, false>(dst, src, D, Dp, acc_t(1));
}
// dst[0..D) = (mul *) src[0..D), converted to scalar_t.
template <typename scalar_t, typename acc_t, bool MUL>
inline void store_row_impl(scalar_t* __restrict dst, const acc_t* __restrict src, int64 D, acc_t mul) {
  int64 d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = typename VecOf<acc_t>::type;
    constexpr int VL = VecOf<acc_t>::L;
    for (; d + VL <= D; d += VL) {
      V x = htwa_simd::load<V>(src + d);
      if constexpr (MUL) x = x * mul;
      htwa_simd::store(dst + d, x);
    }
  }
  for (; d < D; ++d) dst[d] = static_cast<scalar_t>(MUL ? mul * src[d] : src[d]);
}
template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, int64 D, acc_t mul) {
  store_row_impl<scalar_t, acc_t, true>(dst, src, D, mul);
}
template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, int64 D) {
  store_row_impl<scalar_t, acc_t, false>(dst, src, D, acc_t(1));
}
template <typename acc_t>
inline void zero_rows(acc_t* dst, int64 ld, int64 r0, int64 r1) {
  if (r1 > r0) std::fill(dst + r0 * ld, dst + r1 * ld, acc_t(0));
}
// Prefetch one cache line (for writing: prefetchw where the CPU has it). Inline asm because GCC 12 deletes the
// __builtin_prefetch loops of this file (its IPA passes take the builtin for a call without side effects): the
// earlier build had not one prefetch instruction in it.
LFVILA_INLINE void prefetch_line(uintptr_t a, bool write) {
#if defined(__x86_64__)
  const char* p = reinterpret_cast<const char*>(a);
#if defined(__PRFCHW__)
  if (write) {
    asm volatile("prefetchw %0" : : "m"(*p));
    return;
  }
#endif
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(reinterpret_cast<const void*>(a), write ? 1 : 0, 3);
#endif
}

// Prefetches the next work item's rows (its box's tokens in up to 8 tensors) while the current item computes, a
// few (token, tensor) rows per softmax or output row: issued in one burst, an item's thousand-odd cache lines only
// stall on the core's few outstanding-miss slots. Addresses are computed as the tokens come up, so planning costs
// nothing. (Measured on the 2-core EPYC VM: the gather of a layer-1/2 backward item went from a third of the
// kernel's time to about a tenth.)
struct PrefetchPlan {
  struct Stream {
    const char* base;  // the tensor at (b, 0, 0, 0, first head)
    int64 st, sh, sw, shd;  // byte strides of t, h, w and head
    int64 bytes;            // bytes per head row (D elements), or of hg adjacent heads when contiguous
    int64 rows;             // 1 when the heads are contiguous, else hg
    bool write;
  };
  Stream streams[8];
  int ns = 0;
  const BoxTokens* toks = nullptr;
  // cursor over (token, stream) spans; budget grows by `rate` spans per step (16.16 fixed point)
  int64 pos = 0, end = 0, budget = 0, rate = 0;
  void reset() {
    ns = 0;
    toks = nullptr;
    pos = end = budget = 0;
  }
  template <typename T>
  void add(const View<T>& v, int64 b, int64 hd0, int64 hg, int64 D, bool write) {
    constexpr int64 E = static_cast<int64>(sizeof(T));
    const bool contig = v.s[4] == D || hg == 1;
    streams[ns++] = Stream{reinterpret_cast<const char*>(v.p + b * v.s[0] + hd0 * v.s[4]), v.s[1] * E, v.s[2] * E,
                           v.s[3] * E, v.s[4] * E, (contig ? hg : 1) * D * E, contig ? 1 : hg, write};
  }
  // the spans of `nt`, spread evenly over `steps` calls of step()
  void start(const BoxTokens& nt, int64 steps) {
    toks = &nt;
    pos = budget = 0;
    end = nt.n * ns;
    rate = ((end << 16) + std::max<int64>(steps, 1) - 1) / std::max<int64>(steps, 1);
  }
  LFVILA_INLINE void step() {
    if (pos >= end) return;
    budget += rate;
    const int64 e = std::min(budget >> 16, end);
    for (; pos < e; ++pos) {
      const int64 tok = pos / ns;
      const Stream& st = streams[pos - tok * ns];
      const char* r = st.base + toks->t[tok] * st.st + toks->h[tok] * st.sh + toks->w[tok] * st.sw;
      for (int64 rr = 0; rr < st.rows; ++rr, r += st.shd) {
        const uintptr_t first = reinterpret_cast<uintptr_t>(r) & ~uintptr_t(63);
        const uintptr_t last = reinterpret_cast<uintptr_t>(r) + static_cast<uintptr_t>(st.bytes);
        for (uintptr_t a = first; a < last; a += 64) prefetch_line(a, st.write);
      }
    }
  }
};

// Keeps the tokens of the current box and of the next item's box (built early so it can be prefetched).
struct BoxPair {
  BoxTokens cur, nxt;
  int64 cur_box = -1, nxt_box = -1;
  void reserve(int64 nmax) {
    cur.reserve(nmax);
    nxt.reserve(nmax);
  }
  const BoxTokens& get(const Geom& g, int64 box) {
    if (box != cur_box) {
      if (box == nxt_box) {
        std::swap(cur, nxt);
        std::swap(cur_box, nxt_box);
      } else {
        cur.build(g, box);
        cur_box = box;
      }
    }
    return cur;
  }
  const BoxTokens& peek(const Geom& g, int64 box) {
    if (box == cur_box) return cur;
    if (box != nxt_box) {
      nxt.build(g, box);
      nxt_box = box;
    }
    return nxt;
  }
};

// Row helpers: a row has np entries (a multiple of the vector width), those >= n are padding.

// row[j] = Rq[A[j]] for j < n (Rq: the reversed table at base - A[q]); row needs 8 slots past n. For float the runs
// are copied 8 wide in order, each copy's overhang overwritten by the next one.
template <typename acc_t>
inline void bias_row(acc_t* __restrict row, const acc_t* __restrict Rq, const BoxTokens& bt) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename VecOf<acc_t>::type;
    const size_t nr = bt.rj0.size();
    for (size_t r = 0; r < nr; ++r) htwa_simd::store(row + bt.rj0[r], htwa_simd::load<V>(Rq + bt.ra0[r]));
  } else {
    const int32_t* A = bt.A.data();
    for (int64 j = 0; j < bt.n; ++j) row[j] = Rq[A[j]];
  }
}

// PRq[A[j]] += ds[j] for j < n (PRq: reversed dbias partials at base - A[q]); ds is read up to 8 past n. Runs go 8
// wide when their windows cannot overlap (bt.spaced), with the lanes past the run masked to zero.
template <typename acc_t>
inline void dbias_row(acc_t* __restrict PRq, const acc_t* __restrict ds, const BoxTokens& bt) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (bt.spaced) {
      using V = typename VecOf<acc_t>::type;
      using I = typename VecOf<acc_t>::itype;
      const I lane = {0, 1, 2, 3, 4, 5, 6, 7};
      const size_t nr = bt.rj0.size();
      for (size_t r = 0; r < nr; ++r) {
        V d = htwa_simd::load<V>(ds + bt.rj0[r]);
        const I keep = lane < bt.rlen[r];
        d = keep ? d : V{};
        acc_t* dst = PRq + bt.ra0[r];
        htwa_simd::store(dst, htwa_simd::load<V>(dst) + d);
      }
      return;
    }
  }
  const int32_t* A = bt.A.data();
  for (int64 j = 0; j < bt.n; ++j) PRq[A[j]] += ds[j];
}

// Forward row: s (+ bias row, when given: a dense per-class block row) -> exp(s - max) in place; returns (max, sum).
// Two passes: bias + max, then exp + sum.
template <typename acc_t>
inline void softmax_row_fwd(acc_t* __restrict s, const acc_t* __restrict bias, int64 n, int64 np, acc_t& m_out,
                            acc_t& l_out) {
  using V = typename VecOf<acc_t>::type;
  constexpr int VL = VecOf<acc_t>::L;
  for (int64 j = n; j < np; ++j) s[j] = -std::numeric_limits<acc_t>::infinity();
  acc_t m;
  {
    V m0 = htwa_simd::splat<V>(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
    int64 j = 0;
    for (; j + 2 * VL <= np; j += 2 * VL) {
      V x0 = htwa_simd::load<V>(s + j), x1 = htwa_simd::load<V>(s + j + VL);
      if (bias) {
        x0 += htwa_simd::load<V>(bias + j);
        x1 += htwa_simd::load<V>(bias + j + VL);
        htwa_simd::store(s + j, x0);
        htwa_simd::store(s + j + VL, x1);
      }
      m0 = m0 > x0 ? m0 : x0;
      m1 = m1 > x1 ? m1 : x1;
    }
    for (; j < np; j += VL) {
      V x0 = htwa_simd::load<V>(s + j);
      if (bias) {
        x0 += htwa_simd::load<V>(bias + j);
        htwa_simd::store(s + j, x0);
      }
      m0 = m0 > x0 ? m0 : x0;
    }
    m0 = m0 > m1 ? m0 : m1;
    m = htwa_simd::hmax(m0);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    V vsum = htwa_simd::splat<V>(0.f);
    const V vm = htwa_simd::splat<V>(m);
    for (int64 j = 0; j < np; j += VL) {
      V e = htwa_simd::exp_f8_nonpos(htwa_simd::load<V>(s + j) - vm);
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

// Backward row, first pass: p = exp(s (+ bias row) - lse) in place (padding -> 0); returns delta = rowsum(p o dp),
// which equals rowsum(dO o O) since O = P V.
template <typename acc_t>
inline acc_t prob_row_bwd(acc_t* __restrict s, const acc_t* __restrict bias, const acc_t* __restrict dp, int64 n,
                          int64 np, acc_t lse) {
  using V = typename VecOf<acc_t>::type;
  constexpr int VL = VecOf<acc_t>::L;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64 j = n; j < np; ++j) s[j] = -std::numeric_limits<float>::infinity();
    const V vl = htwa_simd::splat<V>(lse);
    V acc = htwa_simd::splat<V>(0.f);
    for (int64 j = 0; j < np; j += VL) {
      V x = htwa_simd::load<V>(s + j);
      if (bias) x += htwa_simd::load<V>(bias + j);
      const V e = htwa_simd::exp_f8_nonpos(x - vl);
      htwa_simd::store(s + j, e);
      acc += e * htwa_simd::load<V>(dp + j);
    }
    return htwa_simd::hsum(acc);
  } else {
    acc_t d = 0;
    for (int64 j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] + (bias ? bias[j] : acc_t(0)) - lse);
      d += s[j] * dp[j];
    }
    for (int64 j = n; j < np; ++j) s[j] = 0;
    return d;
  }
}

// Backward row, second pass: dp -> dS = p o (dp - delta) in place, also added into acc (a dense per-class dS sum)
// when given.
template <typename acc_t>
inline void ds_row_bwd(const acc_t* __restrict p, acc_t* __restrict dp, acc_t* __restrict acc, acc_t delta,
                       int64 np) {
  using V = typename VecOf<acc_t>::type;
  constexpr int VL = VecOf<acc_t>::L;
  const V vd = htwa_simd::splat<V>(delta);
  for (int64 j = 0; j < np; j += VL) {
    const V d = htwa_simd::load<V>(p + j) * (htwa_simd::load<V>(dp + j) - vd);
    htwa_simd::store(dp + j, d);
    if (acc) htwa_simd::store(acc + j, htwa_simd::load<V>(acc + j) + d);
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
  TORCH_CHECK((2 * bias_window[0] - 1) * (2 * bias_window[1] - 1) * (2 * bias_window[2] - 1) < (int64(1) << 31),
              "htwa: bias_window too large for the CPU kernel");
  g.nbox = g.ax[0].nbox * g.ax[1].nbox * g.ax[2].nbox;
  {
    std::vector<int32_t> cls_of(g.nbox);
    const int64 nbh = g.ax[1].nbox, nbw = g.ax[2].nbox;
    for (int64 box = 0; box < g.nbox; ++box)
      cls_of[box] = static_cast<int32_t>(g.ax[0].cls(box / (nbh * nbw)) * 9 + g.ax[1].cls((box / nbw) % nbh) * 3 +
                                         g.ax[2].cls(box % nbw));
    g.order.resize(g.nbox);
    for (int64 box = 0; box < g.nbox; ++box) g.order[box] = box;
    std::stable_sort(g.order.begin(), g.order.end(), [&](int64 x, int64 y) { return cls_of[x] < cls_of[y]; });
    g.cls.resize(g.nbox);
    for (int64 i = 0; i < g.nbox; ++i) g.cls[i] = cls_of[g.order[i]];
  }
  {
    const int grid_i[3] = {static_cast<int>(g.T), static_cast<int>(g.H), static_cast<int>(g.W)};
    int win_i[3], shift_i[3], bwin_i[3];
    for (int a = 0; a < 3; ++a) {
      win_i[a] = static_cast<int>(window[a]);
      shift_i[a] = static_cast<int>(shift[a]);
      bwin_i[a] = static_cast<int>(bias_window[a]);
    }
    g.hg = htwa::make_geometry(grid_i, win_i, shift_i, bwin_i);
  }
  g.bias_c = htwa::bias_center(g.hg);
  return g;
}

inline int64 num_bias_rows(const Geom& g) { return htwa::bias_num_rows(g.hg); }

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor last_dim_contig(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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

// Heads handled together by one work item: the largest divisor hg of heads whose per-head scratch fits the
// budget while leaving at least kMinItems work items. Several heads per item turn the gather of a small box into
// long contiguous reads (a token's heads are adjacent in a qkv projection). Depends on shapes only. The budget is
// larger than L2 on purpose: heads are computed one after the other, so one head's scratch is hot at a time. On the
// 2-core EPYC VM (alternating processes) 1 MiB (layer 2 backward: 8 heads an item) ran the layer 1-3 backward about
// 1.1x faster than 448 KiB, and that 1.1-1.3x faster than 192 KiB (1 or 2 heads an item).
constexpr int64 kGroupScratchBytes = 1024 * 1024;
constexpr int64 kMinItems = 32;
// Dense per-class bias blocks are used while one head's block is at most this large (the backward also keeps a
// dS accumulator block of the same size, so it uses a smaller limit).
constexpr int64 kDenseBytesFwd = 256 * 1024;
constexpr int64 kDenseBytesBwd = 64 * 1024;

inline int64 choose_group(int64 heads, int64 per_head_bytes, int64 items_per_group) {
  int64 best = 1;
  for (int64 hg = 2; hg <= heads; ++hg) {
    if (heads % hg) continue;
    if (hg * per_head_bytes > kGroupScratchBytes || (heads / hg) * items_per_group < kMinItems) break;
    best = hg;
  }
  return best;
}

// Per-thread state shared by forward and backward: the boxes, the dense bias blocks of the current class.
template <typename acc_t>
struct ClassBias {
  int64 key = -1;  // class * heads + first head of the group the blocks were built for
  acc_t* dense = nullptr;  // hg blocks of nm x NP
  int64 block = 0;         // nm * NP
  // Builds (if needed) the dense bias of `cls` for heads [hd0, hd0 + hg); row i of head hh at
  // dense + hh * block + i * np.
  void prepare(const Geom& g, const BoxTokens& bt, int64 cls, int64 hd0, int64 hg, const acc_t* biasR,
               const RevBias& rb) {
    const int64 k = cls * g.heads + hd0;
    if (k == key) return;
    key = k;
    const int64 n = bt.n, np = round_up(n, VecOf<acc_t>::L);
    const int32_t* A = bt.A.data();
    for (int64 hh = 0; hh < hg; ++hh) {
      const acc_t* R_h = biasR + (hd0 + hh) * rb.stride + rb.base;
      acc_t* blk = dense + hh * block;
      for (int64 i = 0; i < n; ++i) {
        acc_t* row = blk + i * np;
        const acc_t* Rq = R_h - A[i];
        for (int64 j = 0; j < n; ++j) row[j] = Rq[A[j]];
        for (int64 j = n; j < np; ++j) row[j] = 0;
      }
    }
  }
};

// The (nbias, heads) table as RevBias lays it out: (heads, nbias + 8), each head's row reversed, zero padded.
inline at::Tensor reversed_bias(const std::optional<at::Tensor>& bias, const Geom& g, at::ScalarType acc,
                                RevBias& rv) {
  const int64 nbias = num_bias_rows(g);
  rv.stride = nbias + 8;
  rv.base = nbias - 1 - g.bias_c;
  if (!bias.has_value()) return at::Tensor();
  at::Tensor r = at::zeros({g.heads, rv.stride}, bias->options().dtype(acc));
  r.narrow(1, 0, nbias).copy_(bias->to(acc).flip(0).t());
  return r;
}

}  // namespace

// Entry points (registered in htwa_cpu.cpp; contract: csrc/HTWA_CONTRACT.md).
std::tuple<at::Tensor, at::Tensor> htwa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef window,
                                                at::IntArrayRef shift, at::IntArrayRef bias_window, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> htwa_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
    at::IntArrayRef shift, at::IntArrayRef bias_window, double scale);
std::tuple<at::Tensor, at::Tensor> htwa_bwd_packed_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
    at::IntArrayRef shift, at::IntArrayRef bias_window, double scale);

// The ordered dbias reduction (htwa_cpu_dbias.cpp): dbias[r, hd] = sum over parts p = 0, 1, ... of the reversed
// chunk partials of head hd (htwa_cpu_bwd.cpp's layout: (groups * parts * hg, stride), row r at nbias - 1 - r).
void htwa_reduce_dbias_cpu(const at::Tensor& partials, int64_t hg, int64_t parts, int64_t stride, at::Tensor& dbias);

}  // namespace lfvila
