// HTWA on the CPU, backward (contract: csrc/HTWA_CONTRACT.md; the design: htwa_cpu_common.h). Each chunk of
// work items writes its own dbias partials; htwa_cpu_dbias.cpp sums them in a fixed order.
#include "htwa_cpu_common.h"

namespace lfvila {
namespace {

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
    if (partials.defined()) htwa_reduce_dbias_cpu(partials, sp.hg, sp.parts, rv.stride, dbias);
  });
  if (bias.has_value() && bias->scalar_type() != acc) dbias = dbias.to(bias->scalar_type());
  return dbias;
}

}  // namespace

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

}  // namespace lfvila
