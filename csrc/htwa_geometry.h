// HTWA geometry, the one C++ copy (csrc/HTWA_CONTRACT.md, "Semantics"): the box split of the grid, the bias rows
// and the inverse bias map, shared by the CPU kernels (htwa_cpu_*.cpp) and the CUDA kernels (host and device).
//
// Plain inline functions for a C++ compiler; __host__ __device__ under nvcc. No torch, no CUDA runtime: the
// header is also compiled on its own by tests/test_htwa_index.py (a tiny g++ driver) and checked against the
// Python mirror lfvila_kernels/geometry.py and the official relative_position_index.
//
// Vocabulary (one axis of length L, window Wn, shift s):
//   box j          the j-th interval of the axis; [0, s) first when s > 0, then windows of Wn clipped to L.
//   c(x)           in-window coordinate (x - s) mod Wn. Inside one box the c values are contiguous: c0 .. c0+n-1.
//   n              flat in-window index in WINDOW geometry: (c_t * Wh + c_h) * Ww + c_w, in [0, Nw).
//   bias key A(n)  n read back in BIAS_WINDOW geometry (bt, bh, bw) and flattened with the table's strides:
//                  A = bt (2Bh-1)(2Bw-1) + bh (2Bw-1) + bw. The contract's row formula is then linear:
//                  row(q, k) = C + A(n_q) - A(n_k), C = (Bt-1)(2Bh-1)(2Bw-1) + (Bh-1)(2Bw-1) + (Bw-1).
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define LFVILA_HD __host__ __device__ __forceinline__
#else
#define LFVILA_HD inline
#endif

namespace lfvila {
namespace htwa {

struct Geometry {
  int grid[3];     // T, H, W
  int win[3];      // effective window
  int shift[3];    // 0 <= shift < win
  int bwin[3];     // bias window (>= win)
  int nbox[3];     // boxes per axis
  int nbox_total;  // boxes per batch element
  int nwin;        // tokens in a full window, Wt * Wh * Ww (largest box)
};

LFVILA_HD int axis_num_boxes(int len, int win, int shift) {
  return (shift > 0 ? 1 : 0) + (len - shift + win - 1) / win;
}

// Box j of one axis: first grid coordinate, length, in-window coordinate of the first token.
LFVILA_HD void axis_box(int len, int win, int shift, int j, int* start, int* n, int* c0) {
  int s;
  if (shift > 0 && j == 0) {
    *start = 0;
    *n = shift;
    *c0 = win - shift;
    return;
  }
  s = shift > 0 ? shift + (j - 1) * win : j * win;
  *start = s;
  *n = (s + win < len ? s + win : len) - s;
  *c0 = 0;
}

LFVILA_HD Geometry make_geometry(const int grid[3], const int win[3], const int shift[3], const int bwin[3]) {
  Geometry g;
  g.nbox_total = 1;
  g.nwin = 1;
  for (int a = 0; a < 3; ++a) {
    g.grid[a] = grid[a];
    g.win[a] = win[a];
    g.shift[a] = shift[a];
    g.bwin[a] = bwin[a];
    g.nbox[a] = axis_num_boxes(grid[a], win[a], shift[a]);
    g.nbox_total *= g.nbox[a];
    g.nwin *= win[a];
  }
  return g;
}

struct Box {
  int start[3];  // first grid coordinate per axis
  int len[3];    // extent per axis
  int c0[3];     // in-window coordinate of start per axis
  int count;     // tokens in the box
};

// Box number `box` in [0, nbox_total), boxes ordered t-major (like the grid).
LFVILA_HD Box decode_box(const Geometry& g, int box) {
  Box b;
  const int j[3] = {box / (g.nbox[1] * g.nbox[2]), (box / g.nbox[2]) % g.nbox[1], box % g.nbox[2]};
  b.count = 1;
  for (int a = 0; a < 3; ++a) {
    axis_box(g.grid[a], g.win[a], g.shift[a], j[a], &b.start[a], &b.len[a], &b.c0[a]);
    b.count *= b.len[a];
  }
  return b;
}

// Box-local token i (t-major inside the box) -> grid coordinates (t, h, w) and window-geometry index n.
LFVILA_HD void box_token(const Geometry& g, const Box& b, int i, int* t, int* h, int* w, int* n) {
  const int ow = i % b.len[2];
  const int oh = (i / b.len[2]) % b.len[1];
  const int ot = i / (b.len[2] * b.len[1]);
  *t = b.start[0] + ot;
  *h = b.start[1] + oh;
  *w = b.start[2] + ow;
  *n = ((b.c0[0] + ot) * g.win[1] + (b.c0[1] + oh)) * g.win[2] + (b.c0[2] + ow);
}

// Window-geometry index n -> box-local token index, or -1 when the box has no token at that position.
LFVILA_HD int window_to_box_local(const Geometry& g, const Box& b, int n) {
  const int cw = n % g.win[2];
  const int ch = (n / g.win[2]) % g.win[1];
  const int ct = n / (g.win[2] * g.win[1]);
  const int ot = ct - b.c0[0], oh = ch - b.c0[1], ow = cw - b.c0[2];
  if (ot < 0 || ot >= b.len[0] || oh < 0 || oh >= b.len[1] || ow < 0 || ow >= b.len[2]) return -1;
  return (ot * b.len[1] + oh) * b.len[2] + ow;
}

LFVILA_HD int bias_num_rows(const Geometry& g) {
  return (2 * g.bwin[0] - 1) * (2 * g.bwin[1] - 1) * (2 * g.bwin[2] - 1);
}

// A(n): window index n read in bias_window geometry, flattened with the bias table's row strides.
LFVILA_HD int bias_key(const Geometry& g, int n) {
  const int Bh = g.bwin[1], Bw = g.bwin[2];
  const int bt = n / (Bh * Bw), bh = (n / Bw) % Bh, bw = n % Bw;
  return (bt * (2 * Bh - 1) + bh) * (2 * Bw - 1) + bw;
}

// C: the row of the zero offset.
LFVILA_HD int bias_center(const Geometry& g) {
  const int Bt = g.bwin[0], Bh = g.bwin[1], Bw = g.bwin[2];
  return ((Bt - 1) * (2 * Bh - 1) + (Bh - 1)) * (2 * Bw - 1) + (Bw - 1);
}

// Bias table row of (query at window index nq, key at window index nk): the contract's formula.
LFVILA_HD int bias_row(const Geometry& g, int nq, int nk) { return bias_center(g) + bias_key(g, nq) - bias_key(g, nk); }

// Host only: the inverse of bias_row over all (nq, nk) in [0, nwin)^2, as CSR. Row r's pairs are
// pairs[offsets[r] .. offsets[r+1]), each pair encoded nq * nwin + nk, in increasing order (so a gather-sum over
// them has a fixed order). Rows no pair maps to (possible when bias_window > window) are empty.
inline void build_bias_inverse(const Geometry& g, std::vector<int32_t>* offsets, std::vector<int32_t>* pairs) {
  const int rows = bias_num_rows(g);
  const int N = g.nwin;
  offsets->assign(static_cast<size_t>(rows) + 1, 0);
  for (int nq = 0; nq < N; ++nq)
    for (int nk = 0; nk < N; ++nk) ++(*offsets)[static_cast<size_t>(bias_row(g, nq, nk)) + 1];
  for (int r = 0; r < rows; ++r) (*offsets)[r + 1] += (*offsets)[r];
  pairs->assign(static_cast<size_t>(N) * N, 0);
  std::vector<int32_t> fill(offsets->begin(), offsets->end() - 1);
  for (int nq = 0; nq < N; ++nq)
    for (int nk = 0; nk < N; ++nk) (*pairs)[fill[bias_row(g, nq, nk)]++] = nq * N + nk;
}

}  // namespace htwa
}  // namespace lfvila
