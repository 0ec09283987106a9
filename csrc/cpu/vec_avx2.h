// 8-wide fp32 loads and stores of fp32 / fp16 / bf16 storage for CPU kernels, compiled
// for AVX2 + FMA + F16C through function attributes (the rest of the extension stays
// baseline x86-64). Call these only from FUSEDOPS_AVX2 functions, after has_avx2().
#pragma once

#include "../common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDOPS_HAVE_AVX2_PATH 1
#include <immintrin.h>

#define FUSEDOPS_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace fusedops::avx2 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
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

}  // namespace fusedops::avx2
#endif
