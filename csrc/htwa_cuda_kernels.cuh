// HTWA CUDA kernels (contract: csrc/HTWA_CONTRACT.md). Launched by htwa_cuda.cu; index math in htwa_geometry.h.
//
// Work decomposition. The token grid splits into disjoint boxes (htwa_geometry.h); inside a box every query
// attends every key and nothing else, so every kernel works on one box at a time and needs no mask.
//   fwd      one block per (batch*head, box, tile of 64 queries); keys stream through shared memory in tiles
//            of 32 with an online softmax (FlashAttention-2 style). Writes out and lse.
//   delta    delta = <dout, out> per (token, head).
//   dkdv     one block per (batch*head, box, tile of 64 keys); loops over the box's queries in tiles of 32,
//            recomputes P = exp(S - lse) and dS = P (dP - delta); dk = scale dS^T q, dv = P^T dout.
//   dq       one block per (batch*head, box, tile of 64 queries); loops over key tiles of 32; dq = scale dS k.
//   dbias    deterministic, no atomics, in two kernels:
//            (1) dbias_partial: one block per (chunk, head, 64x64 tile of (n_q, n_k) in WINDOW geometry). A chunk
//                is a fixed, contiguous range of (batch, box) items; the block visits them in order, recomputes
//                dS for the pairs of its tile that exist in the box, and sums them in registers. Writes
//                part[chunk, head, n_q, n_k] (every entry, zeros included).
//            (2) dbias_gather: one thread per (table row, head): sum over the row's (n_q, n_k) pairs (host-built
//                inverse index, fixed order) of the sum over chunks (fixed order) of part.
//            Boxes never overlap, so dq/dk/dv have exactly one writer per element too.
// All math in fp32 (inputs fp32/fp16/bf16 are converted on load); outputs are rounded once at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_common.cuh"
#include "htwa_geometry.h"

namespace lfvila {
namespace htwa_cuda {

using cuda_common::Carver;
using cuda_common::kThreads;
using cuda_common::to_float;
using htwa::Box;
using htwa::Geometry;

LFVILA_DYNAMIC_SMEM(htwa_smem);

// Everything a kernel needs. Inputs q/k/v are read through their strides (B, T, H, W, heads); every other
// (B, T, H, W, heads[, D]) tensor is contiguous and addressed by its row = (((b*T + t)*H + h)*W + w)*heads + head.
struct Params {
  Geometry g;
  int B, heads, D;
  float scale;
  const float* bias;  // (nbias, heads) fp32, or nullptr
  int bias_c;         // htwa::bias_center(g)
  const void* q;
  const void* k;
  const void* v;
  int64_t sq[5], sk[5], sv[5];
  void* out;             // fwd: (rows, D)
  float* lse;            // fwd: (rows)
  const void* dout;      // bwd: (rows, D)
  const void* o;         // bwd: forward output (rows, D)
  const float* lse_in;   // bwd
  float* delta;          // bwd: (rows) <dout, out>
  void* dq;
  void* dk;
  void* dv;
  // dbias
  float* part;           // (nchunks, heads, nwin, nwin)
  int nchunks;
  int64_t items;         // B * nbox_total
};

LFVILA_HD int64_t strided_offset(const int64_t* s, int b, int t, int h, int w, int head) {
  return b * s[0] + t * s[1] + h * s[2] + w * s[3] + head * s[4];
}

LFVILA_HD int64_t row_index(const Params& p, int b, int t, int h, int w, int head) {
  return ((((int64_t)b * p.g.grid[0] + t) * p.g.grid[1] + h) * p.g.grid[2] + w) * p.heads + head;
}

LFVILA_HD int tiles_per_box(const Geometry& g, int tile) { return (g.nwin + tile - 1) / tile; }

// Block index -> (b, head, box, tile). Flattened into blockIdx.x (b*heads slowest), so no grid dimension limit.
struct BlockWork {
  int b, head, box, tile;
};
LFVILA_HD BlockWork decode_block(const Params& p, int64_t x, int ntile) {
  BlockWork w;
  w.tile = static_cast<int>(x % ntile);
  x /= ntile;
  w.box = static_cast<int>(x % p.g.nbox_total);
  x /= p.g.nbox_total;
  w.head = static_cast<int>(x % p.heads);
  w.b = static_cast<int>(x / p.heads);
  return w;
}

LFVILA_HD float bias_value(const Params& p, int aq, int ak, int head) {
  return p.bias ? p.bias[(int64_t)(p.bias_c + aq - ak) * p.heads + head] : 0.0f;
}

// ------------------------------------------------------------------------------------------------------------
// forward

constexpr int kFwdQ = 64;  // queries per block
constexpr int kFwdK = 32;  // keys per streamed tile

struct FwdSmem {
  int64_t *qoff, *orow, *koff, *voff;
  float *q, *k, *v, *p, *alpha, *l, *m;
  int *qa, *ka;
  size_t bytes;
  LFVILA_HD FwdSmem(unsigned char* base, int D) {
    Carver c(base);
    qoff = c.take<int64_t>(kFwdQ);
    orow = c.take<int64_t>(kFwdQ);
    koff = c.take<int64_t>(kFwdK);
    voff = c.take<int64_t>(kFwdK);
    q = c.take<float>(kFwdQ * (D + 1));  // pre-scaled; padded rows: lanes read different queries
    k = c.take<float>(kFwdK * D);
    v = c.take<float>(kFwdK * D);
    p = c.take<float>(kFwdQ * (kFwdK + 1));
    alpha = c.take<float>(kFwdQ);
    l = c.take<float>(kFwdQ);
    m = c.take<float>(kFwdQ);
    qa = c.take<int>(kFwdQ);
    ka = c.take<int>(kFwdK);
    bytes = c.off;
  }
};

template <typename scalar_t, int DMAX>
__global__ void __launch_bounds__(kThreads) htwa_fwd_kernel(Params p) {
  constexpr int DPT = DMAX / 4;  // output columns per thread (4 threads per query row)
  constexpr int KPT = kFwdK / 4;  // scores per thread (4 threads per key column group)
  const int tid = threadIdx.x;
  const int D = p.D, DP = D + 1;
  const BlockWork bw = decode_block(p, blockIdx.x, tiles_per_box(p.g, kFwdQ));
  const Box box = htwa::decode_box(p.g, bw.box);
  const int q0 = bw.tile * kFwdQ;
  if (q0 >= box.count) return;  // whole block: this box has fewer query tiles
  const int nq = min(kFwdQ, box.count - q0);
  FwdSmem s(htwa_smem, D);
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);

  for (int r = tid; r < nq; r += kThreads) {
    int t, h, w, n;
    htwa::box_token(p.g, box, q0 + r, &t, &h, &w, &n);
    s.qoff[r] = strided_offset(p.sq, bw.b, t, h, w, bw.head);
    s.orow[r] = row_index(p, bw.b, t, h, w, bw.head);
    s.qa[r] = htwa::bias_key(p.g, n);
  }
  __syncthreads();
  for (int idx = tid; idx < kFwdQ * D; idx += kThreads) {
    const int r = idx / D, d = idx - r * D;
    s.q[r * DP + d] = r < nq ? to_float(Q[s.qoff[r] + d]) * p.scale : 0.0f;
  }

  // running softmax state of query row `tid` (threads 0..63) and the output accumulator of (tid/4, tid%4)
  float m_run = -INFINITY, l_run = 0.0f;
  float acc[DPT];
#pragma unroll
  for (int j = 0; j < DPT; ++j) acc[j] = 0.0f;

  for (int k0 = 0; k0 < box.count; k0 += kFwdK) {
    const int nk = min(kFwdK, box.count - k0);
    for (int r = tid; r < nk; r += kThreads) {
      int t, h, w, n;
      htwa::box_token(p.g, box, k0 + r, &t, &h, &w, &n);
      s.koff[r] = strided_offset(p.sk, bw.b, t, h, w, bw.head);
      s.voff[r] = strided_offset(p.sv, bw.b, t, h, w, bw.head);
      s.ka[r] = htwa::bias_key(p.g, n);
    }
    __syncthreads();
    for (int idx = tid; idx < kFwdK * D; idx += kThreads) {
      const int r = idx / D, d = idx - r * D;
      s.k[idx] = r < nk ? to_float(K[s.koff[r] + d]) : 0.0f;
      s.v[idx] = r < nk ? to_float(V[s.voff[r] + d]) : 0.0f;
    }
    __syncthreads();

    {  // scores S[qi][kj] = scale q.k + bias, qi = tid % 64 (lanes: different queries), kj = tid / 64 + 4 j
      const int qi = tid % kFwdQ, kb = tid / kFwdQ;
      float sc[KPT];
#pragma unroll
      for (int j = 0; j < KPT; ++j) sc[j] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float qv = s.q[qi * DP + d];
#pragma unroll
        for (int j = 0; j < KPT; ++j) sc[j] += qv * s.k[(kb + 4 * j) * D + d];
      }
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        const int kj = kb + 4 * j;
        s.p[qi * (kFwdK + 1) + kj] =
            (qi < nq && kj < nk) ? sc[j] + bias_value(p, s.qa[qi], s.ka[kj], bw.head) : -INFINITY;
      }
    }
    __syncthreads();

    if (tid < kFwdQ) {  // online softmax of row tid over this key tile
      float* row = s.p + tid * (kFwdK + 1);
      float mx = -INFINITY;
      for (int j = 0; j < kFwdK; ++j) mx = fmaxf(mx, row[j]);
      const float m_new = fmaxf(m_run, mx);
      float alpha = 1.0f, sum = 0.0f;
      if (m_new == -INFINITY) {  // padding row (tid >= nq): keep it all zero
        for (int j = 0; j < kFwdK; ++j) row[j] = 0.0f;
      } else {
        alpha = expf(m_run - m_new);  // 0 on the first tile (m_run = -inf)
        for (int j = 0; j < kFwdK; ++j) {
          const float e = expf(row[j] - m_new);  // 0 for padding keys
          row[j] = e;
          sum += e;
        }
      }
      l_run = l_run * alpha + sum;
      m_run = m_new;
      s.alpha[tid] = alpha;
    }
    __syncthreads();

    {  // acc = alpha acc + P V for output row tid / 4, columns tid % 4 + 4 j
      const int qi = tid / 4, lane = tid % 4;
      const float a = s.alpha[qi];
#pragma unroll
      for (int j = 0; j < DPT; ++j) acc[j] *= a;
      for (int kk = 0; kk < nk; ++kk) {
        const float pv = s.p[qi * (kFwdK + 1) + kk];
#pragma unroll
        for (int j = 0; j < DPT; ++j) {
          const int d = lane + 4 * j;
          if (d < D) acc[j] += pv * s.v[kk * D + d];
        }
      }
    }
    __syncthreads();  // the next tile overwrites k, v, p
  }

  if (tid < kFwdQ) {
    s.l[tid] = l_run;
    if (tid < nq) p.lse[s.orow[tid]] = m_run + logf(l_run);
  }
  __syncthreads();
  {
    const int qi = tid / 4, lane = tid % 4;
    if (qi < nq) {
      const float inv = 1.0f / s.l[qi];
      scalar_t* O = static_cast<scalar_t*>(p.out) + s.orow[qi] * D;
#pragma unroll
      for (int j = 0; j < DPT; ++j) {
        const int d = lane + 4 * j;
        if (d < D) O[d] = static_cast<scalar_t>(acc[j] * inv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// backward: delta = <dout, out> per row

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) htwa_delta_kernel(Params p, int64_t rows) {
  const scalar_t* dO = static_cast<const scalar_t*>(p.dout);
  const scalar_t* O = static_cast<const scalar_t*>(p.o);
  for (int64_t r = blockIdx.x * (int64_t)kThreads + threadIdx.x; r < rows; r += (int64_t)gridDim.x * kThreads) {
    float acc = 0.0f;
    for (int d = 0; d < p.D; ++d) acc += to_float(dO[r * p.D + d]) * to_float(O[r * p.D + d]);
    p.delta[r] = acc;
  }
}

// ------------------------------------------------------------------------------------------------------------
// backward: dk, dv

constexpr int kDkvK = 64;  // keys per block
constexpr int kDkvQ = 32;  // queries per streamed tile

struct DkvSmem {
  int64_t *koff, *voff, *krow, *qoff, *qrow;
  float *k, *v, *q, *dout, *p, *ds, *lse, *delta;
  int *qa, *ka;
  size_t bytes;
  LFVILA_HD DkvSmem(unsigned char* base, int D) {
    Carver c(base);
    koff = c.take<int64_t>(kDkvK);
    voff = c.take<int64_t>(kDkvK);
    krow = c.take<int64_t>(kDkvK);
    qoff = c.take<int64_t>(kDkvQ);
    qrow = c.take<int64_t>(kDkvQ);
    k = c.take<float>(kDkvK * (D + 1));
    v = c.take<float>(kDkvK * (D + 1));
    q = c.take<float>(kDkvQ * D);
    dout = c.take<float>(kDkvQ * D);
    p = c.take<float>(kDkvQ * (kDkvK + 1));
    ds = c.take<float>(kDkvQ * (kDkvK + 1));
    lse = c.take<float>(kDkvQ);
    delta = c.take<float>(kDkvQ);
    qa = c.take<int>(kDkvQ);
    ka = c.take<int>(kDkvK);
    bytes = c.off;
  }
};

template <typename scalar_t, int DMAX>
__global__ void __launch_bounds__(kThreads) htwa_dkdv_kernel(Params p) {
  constexpr int DPT = DMAX / 4;
  constexpr int QPT = kDkvQ / 4;
  const int tid = threadIdx.x;
  const int D = p.D, DP = D + 1;
  const BlockWork bw = decode_block(p, blockIdx.x, tiles_per_box(p.g, kDkvK));
  const Box box = htwa::decode_box(p.g, bw.box);
  const int k0 = bw.tile * kDkvK;
  if (k0 >= box.count) return;
  const int nk = min(kDkvK, box.count - k0);
  DkvSmem s(htwa_smem, D);
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);
  const scalar_t* dO = static_cast<const scalar_t*>(p.dout);

  for (int r = tid; r < nk; r += kThreads) {
    int t, h, w, n;
    htwa::box_token(p.g, box, k0 + r, &t, &h, &w, &n);
    s.koff[r] = strided_offset(p.sk, bw.b, t, h, w, bw.head);
    s.voff[r] = strided_offset(p.sv, bw.b, t, h, w, bw.head);
    s.krow[r] = row_index(p, bw.b, t, h, w, bw.head);
    s.ka[r] = htwa::bias_key(p.g, n);
  }
  __syncthreads();
  for (int idx = tid; idx < kDkvK * D; idx += kThreads) {
    const int r = idx / D, d = idx - r * D;
    s.k[r * DP + d] = r < nk ? to_float(K[s.koff[r] + d]) : 0.0f;
    s.v[r * DP + d] = r < nk ? to_float(V[s.voff[r] + d]) : 0.0f;
  }

  float acc_dk[DPT], acc_dv[DPT];
#pragma unroll
  for (int j = 0; j < DPT; ++j) acc_dk[j] = acc_dv[j] = 0.0f;

  for (int q0 = 0; q0 < box.count; q0 += kDkvQ) {
    const int nq = min(kDkvQ, box.count - q0);
    for (int r = tid; r < nq; r += kThreads) {
      int t, h, w, n;
      htwa::box_token(p.g, box, q0 + r, &t, &h, &w, &n);
      s.qoff[r] = strided_offset(p.sq, bw.b, t, h, w, bw.head);
      s.qrow[r] = row_index(p, bw.b, t, h, w, bw.head);
      s.qa[r] = htwa::bias_key(p.g, n);
    }
    __syncthreads();
    for (int idx = tid; idx < kDkvQ * D; idx += kThreads) {
      const int r = idx / D, d = idx - r * D;
      s.q[idx] = r < nq ? to_float(Q[s.qoff[r] + d]) : 0.0f;
      s.dout[idx] = r < nq ? to_float(dO[s.qrow[r] * D + d]) : 0.0f;
    }
    for (int r = tid; r < nq; r += kThreads) {
      s.lse[r] = p.lse_in[s.qrow[r]];
      s.delta[r] = p.delta[s.qrow[r]];
    }
    __syncthreads();

    {  // P and dS for key ki = tid % 64 (lanes: different keys), queries qi = tid / 64 + 4 j
      const int ki = tid % kDkvK, qb = tid / kDkvK;
      float sc[QPT], dp[QPT];
#pragma unroll
      for (int j = 0; j < QPT; ++j) sc[j] = dp[j] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float kv = s.k[ki * DP + d], vv = s.v[ki * DP + d];
#pragma unroll
        for (int j = 0; j < QPT; ++j) {
          sc[j] += s.q[(qb + 4 * j) * D + d] * kv;
          dp[j] += s.dout[(qb + 4 * j) * D + d] * vv;
        }
      }
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        const int qi = qb + 4 * j;
        float pr = 0.0f, dsv = 0.0f;
        if (qi < nq && ki < nk) {
          pr = expf(sc[j] * p.scale + bias_value(p, s.qa[qi], s.ka[ki], bw.head) - s.lse[qi]);
          dsv = pr * (dp[j] - s.delta[qi]);
        }
        s.p[qi * (kDkvK + 1) + ki] = pr;
        s.ds[qi * (kDkvK + 1) + ki] = dsv;
      }
    }
    __syncthreads();

    {  // dv += P^T dout, dk += dS^T q for key tid / 4, columns tid % 4 + 4 j
      const int ki = tid / 4, lane = tid % 4;
      for (int qq = 0; qq < nq; ++qq) {
        const float pr = s.p[qq * (kDkvK + 1) + ki], dsv = s.ds[qq * (kDkvK + 1) + ki];
#pragma unroll
        for (int j = 0; j < DPT; ++j) {
          const int d = lane + 4 * j;
          if (d < D) {
            acc_dv[j] += pr * s.dout[qq * D + d];
            acc_dk[j] += dsv * s.q[qq * D + d];
          }
        }
      }
    }
    __syncthreads();  // the next query tile overwrites q, dout, p, ds
  }

  const int ki = tid / 4, lane = tid % 4;
  if (ki < nk) {
    scalar_t* dK = static_cast<scalar_t*>(p.dk) + s.krow[ki] * D;
    scalar_t* dV = static_cast<scalar_t*>(p.dv) + s.krow[ki] * D;
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
      const int d = lane + 4 * j;
      if (d < D) {
        dK[d] = static_cast<scalar_t>(acc_dk[j] * p.scale);
        dV[d] = static_cast<scalar_t>(acc_dv[j]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// backward: dq

constexpr int kDqQ = 64;  // queries per block
constexpr int kDqK = 32;  // keys per streamed tile

struct DqSmem {
  int64_t *qoff, *qrow, *koff, *voff;
  float *q, *dout, *k, *v, *ds, *lse, *delta;
  int *qa, *ka;
  size_t bytes;
  LFVILA_HD DqSmem(unsigned char* base, int D) {
    Carver c(base);
    qoff = c.take<int64_t>(kDqQ);
    qrow = c.take<int64_t>(kDqQ);
    koff = c.take<int64_t>(kDqK);
    voff = c.take<int64_t>(kDqK);
    q = c.take<float>(kDqQ * (D + 1));
    dout = c.take<float>(kDqQ * (D + 1));
    k = c.take<float>(kDqK * D);
    v = c.take<float>(kDqK * D);
    ds = c.take<float>(kDqQ * (kDqK + 1));
    lse = c.take<float>(kDqQ);
    delta = c.take<float>(kDqQ);
    qa = c.take<int>(kDqQ);
    ka = c.take<int>(kDqK);
    bytes = c.off;
  }
};

template <typename scalar_t, int DMAX>
__global__ void __launch_bounds__(kThreads) htwa_dq_kernel(Params p) {
  constexpr int DPT = DMAX / 4;
  constexpr int KPT = kDqK / 4;
  const int tid = threadIdx.x;
  const int D = p.D, DP = D + 1;
  const BlockWork bw = decode_block(p, blockIdx.x, tiles_per_box(p.g, kDqQ));
  const Box box = htwa::decode_box(p.g, bw.box);
  const int q0 = bw.tile * kDqQ;
  if (q0 >= box.count) return;
  const int nq = min(kDqQ, box.count - q0);
  DqSmem s(htwa_smem, D);
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);
  const scalar_t* dO = static_cast<const scalar_t*>(p.dout);

  for (int r = tid; r < nq; r += kThreads) {
    int t, h, w, n;
    htwa::box_token(p.g, box, q0 + r, &t, &h, &w, &n);
    s.qoff[r] = strided_offset(p.sq, bw.b, t, h, w, bw.head);
    s.qrow[r] = row_index(p, bw.b, t, h, w, bw.head);
    s.qa[r] = htwa::bias_key(p.g, n);
    s.lse[r] = p.lse_in[s.qrow[r]];
    s.delta[r] = p.delta[s.qrow[r]];
  }
  __syncthreads();
  for (int idx = tid; idx < kDqQ * D; idx += kThreads) {
    const int r = idx / D, d = idx - r * D;
    s.q[r * DP + d] = r < nq ? to_float(Q[s.qoff[r] + d]) : 0.0f;
    s.dout[r * DP + d] = r < nq ? to_float(dO[s.qrow[r] * D + d]) : 0.0f;
  }

  float acc[DPT];
#pragma unroll
  for (int j = 0; j < DPT; ++j) acc[j] = 0.0f;

  for (int k0 = 0; k0 < box.count; k0 += kDqK) {
    const int nk = min(kDqK, box.count - k0);
    for (int r = tid; r < nk; r += kThreads) {
      int t, h, w, n;
      htwa::box_token(p.g, box, k0 + r, &t, &h, &w, &n);
      s.koff[r] = strided_offset(p.sk, bw.b, t, h, w, bw.head);
      s.voff[r] = strided_offset(p.sv, bw.b, t, h, w, bw.head);
      s.ka[r] = htwa::bias_key(p.g, n);
    }
    __syncthreads();
    for (int idx = tid; idx < kDqK * D; idx += kThreads) {
      const int r = idx / D, d = idx - r * D;
      s.k[idx] = r < nk ? to_float(K[s.koff[r] + d]) : 0.0f;
      s.v[idx] = r < nk ? to_float(V[s.voff[r] + d]) : 0.0f;
    }
    __syncthreads();

    {  // dS for query qi = tid % 64 (lanes: different queries), keys kj = tid / 64 + 4 j
      const int qi = tid % kDqQ, kb = tid / kDqQ;
      float sc[KPT], dp[KPT];
#pragma unroll
      for (int j = 0; j < KPT; ++j) sc[j] = dp[j] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float qv = s.q[qi * DP + d], ov = s.dout[qi * DP + d];
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          sc[j] += qv * s.k[(kb + 4 * j) * D + d];
          dp[j] += ov * s.v[(kb + 4 * j) * D + d];
        }
      }
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        const int kj = kb + 4 * j;
        float dsv = 0.0f;
        if (qi < nq && kj < nk) {
          const float pr = expf(sc[j] * p.scale + bias_value(p, s.qa[qi], s.ka[kj], bw.head) - s.lse[qi]);
          dsv = pr * (dp[j] - s.delta[qi]);
        }
        s.ds[qi * (kDqK + 1) + kj] = dsv;
      }
    }
    __syncthreads();

    {  // dq += dS k for query tid / 4, columns tid % 4 + 4 j
      const int qi = tid / 4, lane = tid % 4;
      for (int kk = 0; kk < nk; ++kk) {
        const float dsv = s.ds[qi * (kDqK + 1) + kk];
#pragma unroll
        for (int j = 0; j < DPT; ++j) {
          const int d = lane + 4 * j;
          if (d < D) acc[j] += dsv * s.k[kk * D + d];
        }
      }
    }
    __syncthreads();
  }

  const int qi = tid / 4, lane = tid % 4;
  if (qi < nq) {
    scalar_t* dQ = static_cast<scalar_t*>(p.dq) + s.qrow[qi] * D;
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
      const int d = lane + 4 * j;
      if (d < D) dQ[d] = static_cast<scalar_t>(acc[j] * p.scale);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// backward: dbias partials per chunk, in window geometry

constexpr int kBiasTile = 64;  // n_q and n_k per block

struct BiasSmem {
  int64_t *qoff, *qrow, *koff, *voff;
  float *q, *dout, *k, *v, *lse, *delta;
  int *qok, *kok;
  size_t bytes;
  LFVILA_HD BiasSmem(unsigned char* base, int D) {
    Carver c(base);
    qoff = c.take<int64_t>(kBiasTile);
    qrow = c.take<int64_t>(kBiasTile);
    koff = c.take<int64_t>(kBiasTile);
    voff = c.take<int64_t>(kBiasTile);
    q = c.take<float>(kBiasTile * D);
    dout = c.take<float>(kBiasTile * D);
    k = c.take<float>(kBiasTile * (D + 1));
    v = c.take<float>(kBiasTile * (D + 1));
    lse = c.take<float>(kBiasTile);
    delta = c.take<float>(kBiasTile);
    qok = c.take<int>(kBiasTile);
    kok = c.take<int>(kBiasTile);
    bytes = c.off;
  }
};

// Items (batch, box) of chunk c: [c * items / nchunks, (c + 1) * items / nchunks).
LFVILA_HD int64_t chunk_begin(int64_t items, int nchunks, int c) { return (int64_t)c * items / nchunks; }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) htwa_dbias_partial_kernel(Params p) {
  constexpr int QPT = kBiasTile * kBiasTile / kThreads;  // 16 pairs per thread
  const int tid = threadIdx.x;
  const int D = p.D, DP = D + 1;
  const int N = p.g.nwin;
  const int nt = (N + kBiasTile - 1) / kBiasTile;
  int64_t x = blockIdx.x;
  const int tk = static_cast<int>(x % nt);
  x /= nt;
  const int tq = static_cast<int>(x % nt);
  x /= nt;
  const int head = static_cast<int>(x % p.heads);
  const int chunk = static_cast<int>(x / p.heads);
  BiasSmem s(htwa_smem, D);
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);
  const scalar_t* dO = static_cast<const scalar_t*>(p.dout);

  // this thread's pairs: key kj = tid % 64 (lanes: different keys), queries qi = tid / 64 + 4 j
  const int kj = tid % kBiasTile, qb = tid / kBiasTile;
  const int nk_w = tk * kBiasTile + kj;
  float acc[QPT], bias[QPT];
#pragma unroll
  for (int j = 0; j < QPT; ++j) {
    const int nq_w = tq * kBiasTile + qb + 4 * j;
    acc[j] = 0.0f;
    bias[j] = (nq_w < N && nk_w < N)
                  ? p.bias[(int64_t)htwa::bias_row(p.g, nq_w, nk_w) * p.heads + head]
                  : 0.0f;
  }

  const int64_t i0 = chunk_begin(p.items, p.nchunks, chunk), i1 = chunk_begin(p.items, p.nchunks, chunk + 1);
  for (int64_t item = i0; item < i1; ++item) {
    const int b = static_cast<int>(item / p.g.nbox_total);
    const Box box = htwa::decode_box(p.g, static_cast<int>(item % p.g.nbox_total));
    // threads 0..63 locate query n_q = tq*64 + tid in this box, threads 64..127 key n_k = tk*64 + tid - 64
    bool mine = false;
    if (tid < 2 * kBiasTile) {
      const bool is_q = tid < kBiasTile;
      const int r = is_q ? tid : tid - kBiasTile;
      const int nw = (is_q ? tq : tk) * kBiasTile + r;
      const int local = nw < N ? htwa::window_to_box_local(p.g, box, nw) : -1;
      mine = local >= 0;
      (is_q ? s.qok : s.kok)[r] = mine ? 1 : 0;
      if (mine) {
        int t, h, w, n;
        htwa::box_token(p.g, box, local, &t, &h, &w, &n);
        if (is_q) {
          s.qoff[r] = strided_offset(p.sq, b, t, h, w, head);
          s.qrow[r] = row_index(p, b, t, h, w, head);
        } else {
          s.koff[r] = strided_offset(p.sk, b, t, h, w, head);
          s.voff[r] = strided_offset(p.sv, b, t, h, w, head);
        }
      }
    }
    const int any_q = __syncthreads_count(mine && tid < kBiasTile);
    const int any_k = __syncthreads_count(mine && tid >= kBiasTile);
    if (any_q == 0 || any_k == 0) continue;  // uniform over the block: no pair of this tile in this box

    for (int idx = tid; idx < kBiasTile * D; idx += kThreads) {
      const int r = idx / D, d = idx - r * D;
      s.q[idx] = s.qok[r] ? to_float(Q[s.qoff[r] + d]) : 0.0f;
      s.dout[idx] = s.qok[r] ? to_float(dO[s.qrow[r] * D + d]) : 0.0f;
      s.k[r * DP + d] = s.kok[r] ? to_float(K[s.koff[r] + d]) : 0.0f;
      s.v[r * DP + d] = s.kok[r] ? to_float(V[s.voff[r] + d]) : 0.0f;
    }
    for (int r = tid; r < kBiasTile; r += kThreads) {
      s.lse[r] = s.qok[r] ? p.lse_in[s.qrow[r]] : 0.0f;
      s.delta[r] = s.qok[r] ? p.delta[s.qrow[r]] : 0.0f;
    }
    __syncthreads();

    float sc[QPT], dp[QPT];
#pragma unroll
    for (int j = 0; j < QPT; ++j) sc[j] = dp[j] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float kv = s.k[kj * DP + d], vv = s.v[kj * DP + d];
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        sc[j] += s.q[(qb + 4 * j) * D + d] * kv;
        dp[j] += s.dout[(qb + 4 * j) * D + d] * vv;
      }
    }
    if (s.kok[kj]) {
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        const int qi = qb + 4 * j;
        if (s.qok[qi]) {
          const float pr = expf(sc[j] * p.scale + bias[j] - s.lse[qi]);
          acc[j] += pr * (dp[j] - s.delta[qi]);
        }
      }
    }
    __syncthreads();  // the next item overwrites the tiles
  }

  if (nk_w < N) {
    float* out = p.part + ((int64_t)chunk * p.heads + head) * N * N;
#pragma unroll
    for (int j = 0; j < QPT; ++j) {
      const int nq_w = tq * kBiasTile + qb + 4 * j;
      if (nq_w < N) out[(int64_t)nq_w * N + nk_w] = acc[j];
    }
  }
}

// dbias[row, head] = sum over the row's pairs (in index order) of sum over chunks (in order) of part.
__global__ void __launch_bounds__(kThreads) htwa_dbias_gather_kernel(const float* part, const int32_t* offsets,
                                                                    const int32_t* pairs, int rows, int heads,
                                                                    int nwin, int nchunks, float* dbias) {
  const int64_t idx = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  if (idx >= (int64_t)rows * heads) return;
  const int row = static_cast<int>(idx / heads), head = static_cast<int>(idx % heads);
  const int64_t plane = (int64_t)nwin * nwin;
  float total = 0.0f;
  for (int i = offsets[row]; i < offsets[row + 1]; ++i) {
    const int32_t pair = pairs[i];
    float sum = 0.0f;
    for (int c = 0; c < nchunks; ++c) sum += part[((int64_t)c * heads + head) * plane + pair];
    total += sum;
  }
  dbias[idx] = total;
}

}  // namespace htwa_cuda
}  // namespace lfvila
