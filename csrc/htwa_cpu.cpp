// HTWA on the CPU: fused forward and backward (contract: csrc/HTWA_CONTRACT.md).
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

// Copy loops stay inline: the default turns short row copies into memmove calls.
#pragma GCC optimize("no-tree-loop-distribute-patterns")

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
          A[i] = static_cast<int32_t>(bt * sb_t + bh * sb_h + bw);
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

// ----------------------------------------------------------------------------------------------------------------
// forward

template <typename acc_t>
int64 fwd_per_head(const Geom& g) {
  constexpr int VL = VecOf<acc_t>::L;
  const int64 Dp = round_up(g.D, VL), NP = round_up(g.nmax, VL);
  return 3 * NP * Dp + Dp * NP;  // Qs, K rows, Vs, Kt
}

template <typename scalar_t, typename acc_t>
void fwd_impl(const Geom& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_t* biasR,
              const RevBias& rv, acc_t scale, at::Tensor& out, at::Tensor& lse) {
  constexpr int VL = VecOf<acc_t>::L;
  const View<scalar_t> Q(q), K(k), Vv(v), O(out);
  const View<acc_t> LSE(lse);
  const int64 D = g.D, Dp = round_up(D, VL), NP = round_up(g.nmax, VL), nm = g.nmax;
  const int64 R = std::min(kRowBlock, nm);
  const int64 per_head = fwd_per_head<acc_t>(g);
  const int64 ipg = g.B * g.nbox;
  const int64 hg = choose_group(g.heads, per_head * static_cast<int64>(sizeof(acc_t)), ipg);
  const int64 nitems = (g.heads / hg) * ipg;
  const bool dense = biasR && nm * NP * static_cast<int64>(sizeof(acc_t)) <= kDenseBytesFwd && ipg >= 2;

  at::parallel_for(0, nitems, 1, [&](int64 begin, int64 end) {
    BoxPair boxes;
    boxes.reserve(nm);
    Scratch<acc_t> mem;
    ClassBias<acc_t> cb;
    PrefetchPlan pq;
    cb.block = nm * NP;
    acc_t* heads_mem = mem.get(hg * per_head + R * NP /*S*/ + R * Dp /*O*/ + R /*1/l*/ + NP + 8 /*bias row*/ +
                               (dense ? hg * cb.block : 0));
    acc_t* S = heads_mem + hg * per_head;
    acc_t* Ob = S + R * NP;
    acc_t* inv = Ob + R * Dp;
    acc_t* brow = inv + R;
    cb.dense = brow + NP + 8;
    auto Qs_of = [&](int64 hh) { return heads_mem + hh * per_head; };
    auto Ks_of = [&](int64 hh) { return Qs_of(hh) + NP * Dp; };
    auto Vs_of = [&](int64 hh) { return Qs_of(hh) + 2 * NP * Dp; };
    auto Kt_of = [&](int64 hh) { return Qs_of(hh) + 3 * NP * Dp; };

    for (int64 it = begin; it < end; ++it) {
      const int64 hd0 = (it / ipg) * hg, bb = it % ipg;
      const int64 pos = bb / g.B, b = bb % g.B, box = g.order[pos];
      const BoxTokens& bt = boxes.get(g, box);
      const int64 n = bt.n, np = round_up(n, VL);
      // gather the box's rows of every head of the group
      for (int64 i = 0; i < n; ++i) {
        const int64 t = bt.t[i], h = bt.h[i], w = bt.w[i];
        const scalar_t *qr = Q.at(b, t, h, w, hd0), *kr = K.at(b, t, h, w, hd0), *vr = Vv.at(b, t, h, w, hd0);
        for (int64 hh = 0; hh < hg; ++hh) {
          load_row(Qs_of(hh) + i * Dp, qr + hh * Q.s[4], D, Dp, scale);
          load_row(Ks_of(hh) + i * Dp, kr + hh * K.s[4], D, Dp);
          load_row(Vs_of(hh) + i * Dp, vr + hh * Vv.s[4], D, Dp);
        }
      }
      // queue the next item's rows; they are prefetched a few per row while this one computes
      pq.reset();
      if (it + 1 < end) {
        const int64 hd2 = ((it + 1) / ipg) * hg, bb2 = (it + 1) % ipg;
        const int64 b2 = bb2 % g.B;
        pq.add(Q, b2, hd2, hg, D, false);
        pq.add(K, b2, hd2, hg, D, false);
        pq.add(Vv, b2, hd2, hg, D, false);
        pq.add(O, b2, hd2, hg, D, true);
        pq.add(LSE, b2, hd2, hg, 1, true);
        pq.start(boxes.peek(g, g.order[bb2 / g.B]), 2 * hg * n);  // softmax rows + output rows
      }
      if (dense) cb.prepare(g, bt, g.cls[pos], hd0, hg, biasR, rv);

      for (int64 hh = 0; hh < hg; ++hh) {
        const int64 hd = hd0 + hh;
        acc_t *Qs = Qs_of(hh), *Ks = Ks_of(hh), *Vs = Vs_of(hh), *Kt = Kt_of(hh);
        zero_rows(Ks, Dp, n, np);
        htwa_simd::transpose(Kt, np, Ks, Dp, np, Dp);
        const acc_t* R_h = biasR ? biasR + hd * rv.stride + rv.base : nullptr;
        const acc_t* dense_h = dense ? cb.dense + hh * cb.block : nullptr;
        for (int64 r0 = 0; r0 < n; r0 += R) {
          const int64 rb = std::min(R, n - r0);
          htwa_simd::gemm<acc_t, false>(rb, np, D, Qs + r0 * Dp, Dp, 1, Kt, np, S, np);
          for (int64 i = 0; i < rb; ++i) {
            pq.step();
            acc_t* s = S + i * np;
            const acc_t* brow_i = nullptr;
            if (dense_h) {
              brow_i = dense_h + (r0 + i) * np;
            } else if (R_h) {
              bias_row(brow, R_h - bt.A[r0 + i], bt);
              brow_i = brow;
            }
            acc_t m, l;
            softmax_row_fwd(s, brow_i, n, np, m, l);
            inv[i] = acc_t(1) / l;
            *LSE.at(b, bt.t[r0 + i], bt.h[r0 + i], bt.w[r0 + i], hd) = m + std::log(l);
          }
          htwa_simd::gemm<acc_t, false>(rb, Dp, n, S, np, 1, Vs, Dp, Ob, Dp);
          for (int64 i = 0; i < rb; ++i) {
            const int64 r = r0 + i;
            pq.step();
            store_row(O.at(b, bt.t[r], bt.h[r], bt.w[r], hd), Ob + i * Dp, D, inv[i]);
          }
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
  RevBias rv;
  const at::Tensor biasR = reversed_bias(bias, g, acc, rv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "htwa_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(g, q, k, v, biasR.defined() ? biasR.data_ptr<acc_t>() : nullptr, rv,
                              static_cast<acc_t>(scale), out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------------------------------------
// backward

// Work split of the backward: head groups of hg heads; each group's B * nbox boxes in `parts` fixed chunks.
struct BwdSplit {
  int64 hg, groups, parts, items_per_group;
  int64 chunks() const { return groups * parts; }
};

template <typename acc_t>
int64 bwd_per_head(const Geom& g) {
  constexpr int VL = VecOf<acc_t>::L;
  const int64 Dp = round_up(g.D, VL), NP = round_up(g.nmax, VL);
  return 5 * NP * Dp /*Qs K dO dK dV*/ + 2 * Dp * NP /*Kt Vt*/ + NP /*lse*/;
}

template <typename acc_t>
BwdSplit bwd_split(const Geom& g) {
  BwdSplit sp;
  sp.items_per_group = g.B * g.nbox;
  sp.hg = choose_group(g.heads, bwd_per_head<acc_t>(g) * static_cast<int64>(sizeof(acc_t)), sp.items_per_group);
  sp.groups = g.heads / sp.hg;
  // at least two boxes a chunk where there are two, so the dense per-class dS sums (bwd_impl) pay off
  sp.parts = std::max<int64>(1, std::min<int64>(sp.items_per_group / 2, (kBiasChunks + sp.groups - 1) / sp.groups));
  return sp;
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const Geom& g, const BwdSplit& sp, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const acc_t* biasR, const RevBias& rv, const at::Tensor& lse,
              acc_t scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, acc_t* partials) {
  constexpr int VL = VecOf<acc_t>::L;
  const View<scalar_t> Q(q), K(k), Vv(v), dO(dout), dQ(dq), dK(dk), dV(dv);
  const View<acc_t> LSE(lse);
  const int64 D = g.D, Dp = round_up(D, VL), NP = round_up(g.nmax, VL), nm = g.nmax;
  const int64 R = std::min(kRowBlock, nm);
  const int64 per_head = bwd_per_head<acc_t>(g);
  const int64 hg = sp.hg, parts = sp.parts, ipg = sp.items_per_group;
  // dense per-class bias blocks (as the forward: they are reused while a thread's boxes keep their class and head
  // group), and dense per-class dS sums for small boxes with several boxes of a class per chunk. Without the dense
  // bias, each row's bias would be assembled from the reversed table with overlapping 8-wide stores, whose loads
  // right after cannot be forwarded from the stores (layers 3-4: about a tenth of the kernel outside the GEMMs).
  const int64 block_bytes = nm * NP * static_cast<int64>(sizeof(acc_t));
  const bool dense = biasR && block_bytes <= kDenseBytesFwd && ipg >= 2;
  const bool dense_ds = dense && block_bytes <= kDenseBytesBwd && ipg >= 2 * parts;

  at::parallel_for(0, sp.chunks(), 1, [&](int64 cbegin, int64 cend) {
    BoxPair boxes;
    boxes.reserve(nm);
    Scratch<acc_t> mem;
    ClassBias<acc_t> cb;
    PrefetchPlan pq;
    cb.block = nm * NP;
    acc_t* heads_mem =
        mem.get(hg * per_head + 2 * R * NP + 8 /*S dP*/ + R * Dp /*dQ*/ + NP + 8 /*bias row*/ +
                (dense ? hg * cb.block : 0) + (dense_ds ? hg * cb.block + 8 : 0));
    acc_t* S = heads_mem + hg * per_head;
    acc_t* dP = S + R * NP;
    acc_t* dQb = dP + R * NP + 8;  // dbias_row reads up to 8 past a dS row
    acc_t* brow = dQb + R * Dp;
    cb.dense = brow + NP + 8;
    acc_t* dS_acc = cb.dense + hg * cb.block;  // per class sums of dS (dense_ds)
    BoxTokens acc_bt;  // the tokens (bias keys, runs) of the class held in dS_acc
    int64 acc_n = 0;   // its token count (0: empty)
    // per-head scratch layout
    auto Qs_of = [&](int64 hh) { return heads_mem + hh * per_head; };
    auto Ks_of = [&](int64 hh) { return Qs_of(hh) + NP * Dp; };
    auto dOs_of = [&](int64 hh) { return Qs_of(hh) + 2 * NP * Dp; };
    auto dKs_of = [&](int64 hh) { return Qs_of(hh) + 3 * NP * Dp; };
    auto dVs_of = [&](int64 hh) { return Qs_of(hh) + 4 * NP * Dp; };
    auto Kt_of = [&](int64 hh) { return Qs_of(hh) + 5 * NP * Dp; };
    auto Vt_of = [&](int64 hh) { return Kt_of(hh) + Dp * NP; };
    auto lse_of = [&](int64 hh) { return Vt_of(hh) + Dp * NP; };

    // scatter the dense dS sums into the chunk's partial table (reversed rows, as RevBias)
    auto flush = [&](acc_t* pbias) {
      if (acc_n == 0) return;
      const int64 n = acc_n, np = round_up(n, VL);
      for (int64 hh = 0; hh < hg; ++hh) {
        const acc_t* blk = dS_acc + hh * cb.block;
        acc_t* pb = pbias + hh * rv.stride + rv.base;
        // a row at a time through the runs, 8 wide for float (dbias_row reads up to 8 past a row: the next row,
        // or the slack after the last block)
        for (int64 i = 0; i < n; ++i) dbias_row(pb - acc_bt.A[i], blk + i * np, acc_bt);
      }
      acc_n = 0;
    };
    // chunk c: heads [h0, h0 + hg), boxes [ib, ie) of the group's B * nbox
    auto chunk_range = [&](int64 c, int64& h0, int64& ib, int64& ie) {
      h0 = (c / parts) * hg;
      const int64 part = c % parts;
      ib = part * ipg / parts;
      ie = (part + 1) * ipg / parts;
    };

    for (int64 c = cbegin; c < cend; ++c) {
      int64 hd0, ib, ie;
      chunk_range(c, hd0, ib, ie);
      acc_t* pbias = biasR ? partials + c * hg * rv.stride : nullptr;
      if (pbias) std::fill(pbias, pbias + hg * rv.stride, acc_t(0));
      int64 acc_cls = -1;

      for (int64 bb = ib; bb < ie; ++bb) {
        const int64 pos = bb / g.B, b = bb % g.B, box = g.order[pos];
        const BoxTokens& bt = boxes.get(g, box);
        const int64 n = bt.n, np = round_up(n, VL);
        // gather (dKs holds the v rows until they are transposed). The output is not read: delta = rowsum(dO o O)
        // is computed as rowsum(P o dP) from the recomputed row (equal, since O = P V), which saves a fifth of
        // the reads.
        for (int64 i = 0; i < n; ++i) {
          const int64 t = bt.t[i], h = bt.h[i], w = bt.w[i];
          const scalar_t *qr = Q.at(b, t, h, w, hd0), *kr = K.at(b, t, h, w, hd0), *vr = Vv.at(b, t, h, w, hd0);
          const scalar_t* dor = dO.at(b, t, h, w, hd0);
          const acc_t* lr = LSE.at(b, t, h, w, hd0);
          for (int64 hh = 0; hh < hg; ++hh) {
            load_row(Qs_of(hh) + i * Dp, qr + hh * Q.s[4], D, Dp, scale);
            load_row(Ks_of(hh) + i * Dp, kr + hh * K.s[4], D, Dp);
            load_row(dOs_of(hh) + i * Dp, dor + hh * dO.s[4], D, Dp);
            load_row(dKs_of(hh) + i * Dp, vr + hh * Vv.s[4], D, Dp);
            lse_of(hh)[i] = lr[hh * LSE.s[4]];
          }
        }
        // queue the next item's rows; they are prefetched a few per row while this one computes
        pq.reset();
        {
          int64 hd2 = -1, bb2 = -1;
          if (bb + 1 < ie) {
            bb2 = bb + 1;
            hd2 = hd0;
          } else if (c + 1 < cend) {
            int64 h2, ib2, ie2;
            chunk_range(c + 1, h2, ib2, ie2);
            bb2 = ib2;
            hd2 = h2;
          }
          if (bb2 >= 0) {
            const int64 b2 = bb2 % g.B;
            pq.add(Q, b2, hd2, hg, D, false);
            pq.add(K, b2, hd2, hg, D, false);
            pq.add(Vv, b2, hd2, hg, D, false);
            pq.add(dO, b2, hd2, hg, D, false);
            pq.add(dQ, b2, hd2, hg, D, true);
            pq.add(dK, b2, hd2, hg, D, true);
            pq.add(dV, b2, hd2, hg, D, true);
            pq.add(LSE, b2, hd2, hg, 1, false);
            pq.start(boxes.peek(g, g.order[bb2 / g.B]), 3 * hg * n);  // softmax, dQ and dK/dV rows
          }
        }
        if (dense) {
          const int64 cls = g.cls[pos];
          cb.prepare(g, bt, cls, hd0, hg, biasR, rv);
          if (dense_ds && cls != acc_cls) {
            flush(pbias);
            acc_cls = cls;
            acc_n = n;
            acc_bt = bt;
            std::fill(dS_acc, dS_acc + hg * cb.block, acc_t(0));
          }
        }

        for (int64 hh = 0; hh < hg; ++hh) {
          const int64 hd = hd0 + hh;
          acc_t *Qs = Qs_of(hh), *Ks = Ks_of(hh), *dOs = dOs_of(hh), *dKs = dKs_of(hh), *dVs = dVs_of(hh);
          acc_t *Kt = Kt_of(hh), *Vt = Vt_of(hh), *lses = lse_of(hh);
          zero_rows(Ks, Dp, n, np);
          zero_rows(dKs, Dp, n, np);
          htwa_simd::transpose(Kt, np, Ks, Dp, np, Dp);
          htwa_simd::transpose(Vt, np, dKs, Dp, np, Dp);
          const acc_t* R_h = biasR ? biasR + hd * rv.stride + rv.base : nullptr;
          const acc_t* dense_h = dense ? cb.dense + hh * cb.block : nullptr;
          acc_t* dsacc_h = dense_ds ? dS_acc + hh * cb.block : nullptr;
          acc_t* PR_h = pbias ? pbias + hh * rv.stride + rv.base : nullptr;

          for (int64 r0 = 0; r0 < n; r0 += R) {
            const int64 rb = std::min(R, n - r0);
            htwa_simd::gemm<acc_t, false>(rb, np, D, Qs + r0 * Dp, Dp, 1, Kt, np, S, np);
            htwa_simd::gemm<acc_t, false>(rb, np, D, dOs + r0 * Dp, Dp, 1, Vt, np, dP, np);
            for (int64 i = 0; i < rb; ++i) {
              pq.step();
              const int64 r = r0 + i;
              acc_t* s = S + i * np;
              acc_t* dp = dP + i * np;
              const acc_t* brow_r = nullptr;
              if (dense_h) {
                brow_r = dense_h + r * np;
              } else if (R_h) {
                bias_row(brow, R_h - bt.A[r], bt);
                brow_r = brow;
              }
              const acc_t dr = prob_row_bwd(s, brow_r, dp, n, np, lses[r]);
              ds_row_bwd(s, dp, dsacc_h ? dsacc_h + r * np : nullptr, dr, np);
              if (!dsacc_h && PR_h) dbias_row(PR_h - bt.A[r], dp, bt);
            }
            // dQ = dS K ; dV += P^T dO ; dK += dS^T (scale q)
            htwa_simd::gemm<acc_t, false>(rb, Dp, n, dP, np, 1, Ks, Dp, dQb, Dp);
            // the first row block writes dK/dV (dKs still holds the v rows, already transposed), later ones add
            htwa_simd::gemm_acc<acc_t>(r0 > 0, n, Dp, rb, S, 1, np, dOs + r0 * Dp, Dp, dVs, Dp);
            htwa_simd::gemm_acc<acc_t>(r0 > 0, n, Dp, rb, dP, 1, np, Qs + r0 * Dp, Dp, dKs, Dp);
            for (int64 i = 0; i < rb; ++i) {
              const int64 r = r0 + i;
              pq.step();
              store_row(dQ.at(b, bt.t[r], bt.h[r], bt.w[r], hd), dQb + i * Dp, D, scale);
            }
          }
          for (int64 i = 0; i < n; ++i) {
            pq.step();
            store_row(dK.at(b, bt.t[i], bt.h[i], bt.w[i], hd), dKs + i * Dp, D);
            store_row(dV.at(b, bt.t[i], bt.h[i], bt.w[i], hd), dVs + i * Dp, D);
          }
        }
      }
      if (dense_ds) flush(pbias);
    }
  });
}

// The backward into caller-provided dq, dk, dv (any strides with stride(-1) == 1: separate tensors, or the three
// slices of one packed (B, T, H, W, 3, heads, D) gradient); returns dbias.
at::Tensor htwa_bwd_into(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window, at::IntArrayRef shift, at::IntArrayRef bias_window, double scale, at::Tensor& dq,
    at::Tensor& dk, at::Tensor& dv) {
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
  // out_in is checked but not read: the kernel gets delta = rowsum(dO o O) from the recomputed P (bwd_impl)
  const at::Tensor dout = last_dim_contig(dout_in);
  const at::Tensor lse = lse_in.to(acc);
  const int64 nbias = num_bias_rows(g);
  at::Tensor dbias = bias.has_value() ? at::zeros({nbias, g.heads}, q.options().dtype(acc))
                                      : at::empty({0}, q.options().dtype(acc));
  if (q.numel() == 0) {
    if (bias.has_value()) dbias = dbias.to(bias->scalar_type());
    return dbias;
  }
  at::Tensor partials;
  RevBias rv;
  const at::Tensor biasR = reversed_bias(bias, g, acc, rv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "htwa_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const BwdSplit sp = bwd_split<acc_t>(g);
    if (bias.has_value()) partials = at::empty({sp.chunks() * sp.hg, rv.stride}, q.options().dtype(acc));
    bwd_impl<scalar_t, acc_t>(g, sp, dout, q, k, v, biasR.defined() ? biasR.data_ptr<acc_t>() : nullptr, rv, lse,
                              static_cast<acc_t>(scale), dq, dk, dv,
                              partials.defined() ? partials.data_ptr<acc_t>() : nullptr);
    if (partials.defined()) {
      // ordered reduction: dbias[r, hd] = sum over parts p (ascending) of the chunk partials of head hd (reversed
      // rows: entry r sits at nbias - 1 - r)
      const acc_t* P = partials.data_ptr<acc_t>();
      acc_t* db = dbias.data_ptr<acc_t>();
      const int64 heads = g.heads, stride = rv.stride;
      at::parallel_for(0, heads, 1, [&](int64 hb, int64 he) {
        for (int64 hd = hb; hd < he; ++hd) {
          const int64 grp = hd / sp.hg, hh = hd % sp.hg;
          for (int64 r = 0; r < nbias; ++r) {
            acc_t s = 0;
            for (int64 p = 0; p < sp.parts; ++p) s += P[((grp * sp.parts + p) * sp.hg + hh) * stride + nbias - 1 - r];
            db[r * heads + hd] = s;
          }
        }
      });
    }
  });
  if (bias.has_value() && bias->scalar_type() != acc) dbias = dbias.to(bias->scalar_type());
  return dbias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> htwa_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
    at::IntArrayRef shift, at::IntArrayRef bias_window, double scale) {
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  at::Tensor dbias = htwa_bwd_into(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dq, dk, dv);
  return {dq, dk, dv, dbias};
}

// Packed gradient: dq, dk, dv written straight into one (B, T, H, W, 3, heads, D) tensor, the gradient of the
// qkv projection's output, so autograd need not stack three separate gradients into it (saves 3 x |q| bytes).
std::tuple<at::Tensor, at::Tensor> htwa_bwd_packed_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window,
    at::IntArrayRef shift, at::IntArrayRef bias_window, double scale) {
  TORCH_CHECK(q.dim() == 6, "htwa_bwd_packed: q must be (B, T, H, W, heads, D), got ", q.sizes());
  const auto sz = q.sizes();
  at::Tensor dqkv = at::empty({sz[0], sz[1], sz[2], sz[3], 3, sz[4], sz[5]}, q.options());
  at::Tensor dq = dqkv.select(4, 0), dk = dqkv.select(4, 1), dv = dqkv.select(4, 2);
  at::Tensor dbias = htwa_bwd_into(dout, q, k, v, bias, out, lse, window, shift, bias_window, scale, dq, dk, dv);
  return {dqkv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lfvila_C, CPU, m) {
  m.impl("htwa_fwd", &htwa_fwd_cpu);
  m.impl("htwa_bwd", &htwa_bwd_cpu);
  m.impl("htwa_bwd_packed", &htwa_bwd_packed_cpu);
}

}  // namespace lfvila
