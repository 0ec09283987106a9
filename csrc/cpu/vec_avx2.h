// 8-wide fp32 loads and stores of fp32 / fp16 / bf16 storage, exp / erf / the activations
// and double-precision sums for CPU kernels, compiled for AVX2 + FMA + F16C through
// function attributes (the rest of the extension stays baseline x86-64). Call these only
// from FUSEDOPS_AVX2 functions, after available().
#pragma once

#include "../common.h"

#include <cstdlib>
#include <string>

// (FUSEDOPS_NO_AVX2 builds without it, as on other architectures: CI compiles that way too)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(FUSEDOPS_NO_AVX2)
#define FUSEDOPS_HAVE_AVX2_PATH 1
#include <immintrin.h>

#define FUSEDOPS_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace fusedops::avx2 {

// The CPU has AVX2 + FMA + F16C, and FUSEDOPS_CPU_AVX2=0 is not set (that runs the portable
// scalar loops instead: how the tests check them on an AVX2 machine). Decided once.
inline bool available() {
  static const bool ok = [] {
    const char* env = std::getenv("FUSEDOPS_CPU_AVX2");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           !(env != nullptr && std::string(env) == "0");
  }();
  return ok;
}

template <typename T>
FUSEDOPS_AVX2 inline __m256 load8(const T* p);

template <>
FUSEDOPS_AVX2 inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
FUSEDOPS_AVX2 inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <>
FUSEDOPS_AVX2 inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

template <typename T>
FUSEDOPS_AVX2 inline void store8(T* p, __m256 v);

template <>
FUSEDOPS_AVX2 inline void store8<float>(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
}

template <>
FUSEDOPS_AVX2 inline void store8<c10::Half>(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Round to nearest even, NaN -> 0x7fc0: the same bits as c10::BFloat16(float).
template <>
FUSEDOPS_AVX2 inline void store8<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(nan));
  r = _mm256_srli_epi32(r, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// ---- fp32 math on 8 lanes ------------------------------------------------------------
// exp(x): x = n·ln2 + r (Cody-Waite split of ln2), |r| <= ln2/2, e^r by its Taylor series to
// r^7 (truncation < 6e-9 relative, under one fp32 ulp), times 2^n built in the exponent
// bits. x is clamped to [-87.3, 88.3] (results within the normal range; e^x is then
// within 1.3e-38 absolute below, finite above); NaN stays NaN.
FUSEDOPS_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 = 0.693359375 - 2.12194440e-4
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 1 / (1 + e^-x)
FUSEDOPS_AVX2 inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// erf(x): Abramowitz & Stegun 7.1.26 on |x| (absolute error <= 1.5e-7), sign restored.
FUSEDOPS_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  return _mm256_or_ps(_mm256_fnmadd_ps(p, e, one), sign);
}

// ---- activations and their derivatives on 8 lanes (fp32) ---------------------------------
// relu keeps NaN (as eager); its derivative is 1 where z > 0. GELU(tanh) as z·sigmoid(2u),
// u = √(2/π)(z + 0.044715z³) (= 0.5z(1 + tanh u)); the derivatives of the sigmoid forms
// take 1 - s as e·s (e = exp(-x), s = 1/(1 + e)): no cancellation where s is near 1.
FUSEDOPS_AVX2 inline __m256 relu8(__m256 z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }

FUSEDOPS_AVX2 inline __m256 relu_grad8(__m256 z) {
  return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(1.f));
}

FUSEDOPS_AVX2 inline __m256 gelu_cdf8(__m256 z) {  // Φ(z) = 0.5(1 + erf(z/√2))
  return _mm256_mul_ps(_mm256_set1_ps(0.5f),
                       _mm256_add_ps(_mm256_set1_ps(1.f), erf8(_mm256_mul_ps(z, _mm256_set1_ps(0.70710678118654752f)))));
}

FUSEDOPS_AVX2 inline __m256 gelu8(__m256 z) { return _mm256_mul_ps(z, gelu_cdf8(z)); }

FUSEDOPS_AVX2 inline __m256 gelu_grad8(__m256 z) {  // Φ(z) + z·φ(z)
  const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),
                                   exp8(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(z, z))));
  return _mm256_fmadd_ps(z, pdf, gelu_cdf8(z));
}

constexpr float kTwoSqrt2OverPi = 2.f * 0.79788456080286536f;

FUSEDOPS_AVX2 inline __m256 gelu_tanh8(__m256 z) {
  const __m256 z3 = _mm256_mul_ps(_mm256_mul_ps(z, z), z);
  return _mm256_mul_ps(z, sigmoid8(_mm256_mul_ps(_mm256_set1_ps(kTwoSqrt2OverPi),
                                                 _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), z3, z))));
}

FUSEDOPS_AVX2 inline __m256 gelu_tanh_grad8(__m256 z) {  // s + z·s(1 - s)·2√(2/π)(1 + 0.134145z²), s = sigmoid(2u)
  const __m256 one = _mm256_set1_ps(1.f), zz = _mm256_mul_ps(z, z);
  const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(kTwoSqrt2OverPi),
                                  _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), zz), z, z));
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), u2));
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
  const __m256 du = _mm256_mul_ps(_mm256_set1_ps(kTwoSqrt2OverPi), _mm256_fmadd_ps(_mm256_set1_ps(0.134145f), zz, one));
  return _mm256_fmadd_ps(_mm256_mul_ps(z, _mm256_mul_ps(s, _mm256_mul_ps(e, s))), du, s);
}

FUSEDOPS_AVX2 inline __m256 silu8(__m256 z) { return _mm256_mul_ps(z, sigmoid8(z)); }

FUSEDOPS_AVX2 inline __m256 silu_grad8(__m256 z) {  // s(1 + z(1 - s))
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
  return _mm256_mul_ps(s, _mm256_fmadd_ps(z, _mm256_mul_ps(e, s), one));
}

// Sums of 8 floats kept in double: lo += lanes 0-3, hi += lanes 4-7.
FUSEDOPS_AVX2 inline void add_pd(__m256d& lo, __m256d& hi, __m256 v) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// lo += a·b, hi += a·b in double (the products exact).
FUSEDOPS_AVX2 inline void fma_pd(__m256d& lo, __m256d& hi, __m256 a, __m256 b) {
  lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_castps256_ps128(b)), lo);
  hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)), hi);
}

// lo += (v[0:4] - mean)², hi += (v[4:8] - mean)² in double (mean: 4 equal lanes, or the
// means of 8 lanes' channels split as lo / hi).
FUSEDOPS_AVX2 inline void sq_dev_pd(__m256d& lo, __m256d& hi, __m256 v, __m256d mean_lo, __m256d mean_hi) {
  const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), mean_lo);
  const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), mean_hi);
  lo = _mm256_fmadd_pd(d0, d0, lo);
  hi = _mm256_fmadd_pd(d1, d1, hi);
}

FUSEDOPS_AVX2 inline double hsum_pd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

}  // namespace fusedops::avx2
#endif
