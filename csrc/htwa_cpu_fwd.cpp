// HTWA on the CPU, forward (contract: csrc/HTWA_CONTRACT.md; the design: htwa_cpu_common.h).
#include "htwa_cpu_common.h"

namespace lfvila {
namespace {

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

}  // namespace

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

}  // namespace lfvila
