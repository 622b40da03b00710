// Small register-blocked GEMMs and a vectorised exp for the HTWA CPU kernel, written with GCC/Clang vector
// extensions (32-byte vectors: AVX/AVX2 with -march=native; split into two 16-byte halves elsewhere).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lfvila {
namespace htwa_simd {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t itype __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

#define LFVILA_INLINE inline __attribute__((always_inline))

template <typename V, typename T>
LFVILA_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
LFVILA_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
LFVILA_INLINE V splat(T x) {
  V v = {};
  return v + x;
}
template <typename V>
LFVILA_INLINE auto hsum(V v) {
  auto s = v[0];
  for (unsigned i = 1; i < sizeof(V) / sizeof(s); ++i) s += v[i];
  return s;
}
template <typename V>
LFVILA_INLINE auto hmax(V v) {
  auto s = v[0];
  for (unsigned i = 1; i < sizeof(V) / sizeof(s); ++i) s = s > v[i] ? s : v[i];
  return s;
}
#if defined(__AVX__)
LFVILA_INLINE float hsum(VecOf<float>::type v) {
  const __m256 x = (__m256)v;
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
LFVILA_INLINE float hmax(VecOf<float>::type v) {
  const __m256 x = (__m256)v;
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#endif

// exp for 8 floats x <= 0 (softmax arguments s - max or s - lse, so no upper clamp): Cephes-style 2^n * poly(r),
// |r| <= ln2/2, about 1-2 ulp; exactly 0 below -87.33 (where expf would be subnormal) and for -inf.
LFVILA_INLINE VecOf<float>::type exp_f8_nonpos(VecOf<float>::type x) {
  using V = VecOf<float>::type;
  using I = VecOf<float>::itype;
  const V lo = splat<V>(-87.33654f);
  const I under = x < lo;  // also true for -inf
  x = x < lo ? lo : x;
  V fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.f) - 12582912.f;  // round to nearest (|fx| < 2^22)
  V r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  I n = __builtin_convertvector(fx, I);
  I bits = (n + 127) << 23;
  V p2;
  std::memcpy(&p2, &bits, sizeof(V));
  y = y * p2;
  I yi;
  std::memcpy(&yi, &y, sizeof(V));
  yi = yi & ~under;
  std::memcpy(&y, &yi, sizeof(V));
  return y;
}

// Micro-kernel: C[MR x NV*L] (+)= sum_k A(r, k) * B[k, :], with A(r, k) = A[r * ars + k * aks].
template <typename T, int MR, int NV, bool ACC>
LFVILA_INLINE void micro(int64_t K, const T* __restrict A, int64_t ars, int64_t aks, const T* __restrict B,
                         int64_t ldb, T* __restrict C, int64_t ldc) {
  using V = typename VecOf<T>::type;
  constexpr int L = VecOf<T>::L;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load<V>(C + r * ldc + v * L) : V{};
  const T* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load<V>(B + k * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T s = a[r][k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += b[v] * s;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

template <typename T, int NV, bool ACC>
LFVILA_INLINE void panel(int64_t M, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb, T* C,
                         int64_t ldc) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) micro<T, MR, NV, ACC>(K, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc);
  const T* a = A + i * ars;
  T* c = C + i * ldc;
  switch (M - i) {
    case 5: micro<T, 5, NV, ACC>(K, a, ars, aks, B, ldb, c, ldc); break;
    case 4: micro<T, 4, NV, ACC>(K, a, ars, aks, B, ldb, c, ldc); break;
    case 3: micro<T, 3, NV, ACC>(K, a, ars, aks, B, ldb, c, ldc); break;
    case 2: micro<T, 2, NV, ACC>(K, a, ars, aks, B, ldb, c, ldc); break;
    case 1: micro<T, 1, NV, ACC>(K, a, ars, aks, B, ldb, c, ldc); break;
    default: break;
  }
}

// C[M x N] (+)= A(M x K) * B[K x N]; N a multiple of the vector width; B, C row-major (ldb, ldc);
// A(i, k) = A[i * ars + k * aks] (ars = lda, aks = 1 for a row-major A; ars = 1, aks = lda for A transposed).
template <typename T, bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb, T* C,
          int64_t ldc) {
  constexpr int L = VecOf<T>::L;
  const int64_t nvec = N / L;
  int64_t j = 0;
  for (; j + 2 <= nvec; j += 2) panel<T, 2, ACC>(M, K, A, ars, aks, B + j * L, ldb, C + j * L, ldc);
  if (j < nvec) panel<T, 1, ACC>(M, K, A, ars, aks, B + j * L, ldb, C + j * L, ldc);
}

// gemm with the accumulate flag chosen at run time: C = A B (accumulate false) or C += A B.
template <typename T>
inline void gemm_acc(bool accumulate, int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t aks,
                     const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (accumulate)
    gemm<T, true>(M, N, K, A, ars, aks, B, ldb, C, ldc);
  else
    gemm<T, false>(M, N, K, A, ars, aks, B, ldb, C, ldc);
}

// dst[d * ldd + i] = src[i * lds + d] for i < n, d < m; n and m multiples of the vector width (8 floats /
// 4 doubles), rows of src and dst must not overlap.
template <typename T>
inline void transpose(T* __restrict dst, int64_t ldd, const T* __restrict src, int64_t lds, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < m; ++d) dst[d * ldd + i] = src[i * lds + d];
}

#if defined(__AVX__)
LFVILA_INLINE void transpose8x8(float* __restrict dst, int64_t ldd, const float* __restrict src, int64_t lds) {
  const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
               r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds),
               r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds),
               r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

template <>
inline void transpose<float>(float* __restrict dst, int64_t ldd, const float* __restrict src, int64_t lds, int64_t n,
                             int64_t m) {
  for (int64_t i = 0; i < n; i += 8)
    for (int64_t d = 0; d < m; d += 8) transpose8x8(dst + d * ldd + i, ldd, src + i * lds + d, lds);
}
#endif

}  // namespace htwa_simd
}  // namespace lfvila
