// 8-bit optimizer step on the CPU: every tensor of the step in one parallel loop over
// quantization blocks. Per block of 256 elements: dequantize -> fp32 update -> absmax ->
// requantize (csrc/optim8bit.h holds the math, shared with the CUDA kernel). On x86-64 CPUs
// with AVX2 + FMA + F16C, whole blocks run 8 lanes at a time with the same separately
// rounded operations in the same order (IEEE multiply, add, divide and sqrt: the same bits
// as the scalar loops, which take the last, partial block and CPUs without AVX2).
#include "../optim8bit_tensors.h"
#include "vec_avx2.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fusedops {
namespace optim8bit {
namespace {

constexpr int64_t kGrainBlocks = 16;  // quantization blocks per parallel task

// The bucket table of the signed / unsigned map inside qmaps (uint32 entries stored as fp32 bits).
const uint32_t* tables(const float* qm, bool is_signed) {
  return reinterpret_cast<const uint32_t*>(qm + (is_signed ? kSignedTable : kUnsignedTable));
}

// Normalise and quantize a block (csrc/optim8bit.h quantize: one bucket-table lookup).
void quantize_block(const float* x, int len, float absmax, const uint32_t* table, uint8_t* out) {
  for (int i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(quantize(normalise(x[i], absmax), table));
}

template <int64_t K, typename T>
void step_block(const StepTensor& t, int64_t b, const float* qm, const Hyper& h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  const int64_t begin = b * kQBlock;
  const int len = static_cast<int>(std::min<int64_t>(kQBlock, t.n - begin));
  T* p = static_cast<T*>(t.p) + begin;
  const T* g = static_cast<const T*>(t.g) + begin;
  float m[kQBlock], v[kQBlock];
  const bool f1 = t.flags & kState1F32, f2 = t.flags & kState2F32;
  if (f1) {
    const float* s = static_cast<const float*>(t.s1) + begin;
    for (int i = 0; i < len; ++i) m[i] = s[i];
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(t.s1) + begin;
    const float a = t.a1[b];
    for (int i = 0; i < len; ++i) m[i] = fmul(qm[kSignedCode + s[i]], a);
  }
  if constexpr (kTwo) {
    if (f2) {
      const float* s = static_cast<const float*>(t.s2) + begin;
      for (int i = 0; i < len; ++i) v[i] = s[i];
    } else {
      const uint8_t* s = static_cast<const uint8_t*>(t.s2) + begin;
      const float a = t.a2[b];
      for (int i = 0; i < len; ++i) v[i] = fmul(qm[kUnsignedCode + s[i]], a);
    }
  }
  float max1 = 0.f, max2 = 0.f;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const uint32_t key = kBf16 && h.sr ? sr_tensor_key(h.sr_key, t.index) : 0u;
  for (int i = 0; i < len; ++i) {
    float pi = static_cast<float>(p[i]);
    float vi = kTwo ? v[i] : 0.f;
    update<K>(pi, static_cast<float>(g[i]), m[i], vi, h);
    if (kBf16 && h.sr) pi = round_bf16_stochastic(pi, sr_bits(key, begin + i));
    p[i] = static_cast<T>(pi);
    max1 = std::max(max1, std::fabs(m[i]));
    if constexpr (kTwo) {
      v[i] = vi;
      max2 = std::max(max2, std::fabs(vi));
    }
  }
  if (f1) {
    float* s = static_cast<float*>(t.s1) + begin;
    for (int i = 0; i < len; ++i) s[i] = m[i];
  } else {
    quantize_block(m, len, max1, tables(qm, true), static_cast<uint8_t*>(t.s1) + begin);
    t.a1[b] = max1;
  }
  if constexpr (kTwo) {
    if (f2) {
      float* s = static_cast<float*>(t.s2) + begin;
      for (int i = 0; i < len; ++i) s[i] = v[i];
    } else {
      quantize_block(v, len, max2, tables(qm, false), static_cast<uint8_t*>(t.s2) + begin);
      t.a2[b] = max2;
    }
  }
}

#ifdef FUSEDOPS_HAVE_AVX2_PATH
// ---- AVX2 path: one whole block (kQBlock elements), 8 lanes ---------------------------------
FUSEDOPS_AVX2 inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
FUSEDOPS_AVX2 inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
FUSEDOPS_AVX2 inline __m256 splat(float x) { return _mm256_set1_ps(x); }

// The hyperparameters broadcast to 8 lanes once per block (not reloaded per vector: the
// stores through p could alias them as far as the compiler knows).
struct Hyper8 {
  __m256 lr_neg, beta1, omb1, beta2, omb2, eps, wd, decay, step_neg, inv_bc2_sqrt;
  bool first, nesterov;
};

FUSEDOPS_AVX2 inline Hyper8 hyper8(const Hyper& h) {
  return {splat(-h.lr), splat(h.beta1), splat(h.omb1), splat(h.beta2), splat(h.omb2), splat(h.eps), splat(h.wd),
          splat(h.decay), splat(-h.step_size), splat(h.inv_bc2_sqrt), h.first, h.nesterov};
}

// update<K> of csrc/optim8bit.h on 8 lanes; lanes with a non-finite g: m = v = 0, p kept.
template <int64_t K>
FUSEDOPS_AVX2 inline void update8(__m256& p, __m256 g, __m256& m, __m256& v, const Hyper8& h) {
  const __m256i expo = _mm256_set1_epi32(0x7F800000);
  const __m256 bad = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(g), expo), expo));
  __m256 p1 = p, m1, v1 = v;
  if constexpr (K == kAdamW || K == kAdam) {
    if constexpr (K == kAdamW) p1 = mul(p, h.decay);
    else g = add(g, mul(h.wd, p));
    m1 = add(mul(h.beta1, m), mul(h.omb1, g));
    v1 = add(mul(h.beta2, v), mul(h.omb2, mul(g, g)));
    const __m256 denom = add(mul(_mm256_sqrt_ps(v1), h.inv_bc2_sqrt), h.eps);
    p1 = add(p1, mul(h.step_neg, _mm256_div_ps(m1, denom)));
  } else if constexpr (K == kLion) {
    p1 = mul(p, h.decay);
    const __m256 c = add(mul(h.beta1, m), mul(h.omb1, g));
    const __m256 zero = _mm256_setzero_ps();
    const __m256 u = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ), splat(1.f)),
                                  _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_LT_OQ), splat(-1.f)));
    p1 = add(p1, mul(h.lr_neg, u));
    m1 = add(mul(h.beta2, m), mul(h.omb2, g));
  } else {
    g = add(g, mul(h.wd, p));
    m1 = h.first ? g : add(mul(h.beta1, m), mul(h.omb2, g));
    const __m256 d = h.nesterov ? add(g, mul(h.beta1, m1)) : m1;
    p1 = add(p, mul(h.lr_neg, d));
  }
  p = _mm256_blendv_ps(p1, p, bad);
  m = _mm256_andnot_ps(bad, m1);
  v = _mm256_andnot_ps(bad, v1);
}

FUSEDOPS_AVX2 inline __m256i fmix32_8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// round_bf16_stochastic(x, sr_bits(key, element + lane)) of 8 lanes.
FUSEDOPS_AVX2 inline __m256 round_bf16_stochastic8(__m256 x, uint32_t key, int64_t element) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(element))), lane);
  const __m256i rnd = fmix32_8(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(key)),
                                                _mm256_mullo_epi32(idx, _mm256_set1_epi32(static_cast<int>(0x9E3779B9u)))));
  const __m256i b = _mm256_castps_si256(x), expo = _mm256_set1_epi32(0x7F800000);
  const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(b, expo), expo);
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_and_si256(rnd, _mm256_set1_epi32(0xFFFF))),
                                     _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_castsi256_ps(_mm256_blendv_epi8(r, b, special));
}

// quantize() of csrc/optim8bit.h on 8 lanes: the codes as int32.
FUSEDOPS_AVX2 inline __m256i quantize8(__m256 x, const uint32_t* table) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i a = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(a, kBucketShift), _mm256_set1_epi32(kBucketBase));
  k = _mm256_min_epi32(_mm256_max_epi32(k, _mm256_setzero_si256()), _mm256_set1_epi32(kBuckets - 1));
  k = _mm256_add_epi32(k, _mm256_and_si256(neg, _mm256_set1_epi32(kBuckets)));
  const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), k, 4);
  const __m256i low = _mm256_set1_epi32(0x7FFFFF);
  const __m256i mant = _mm256_xor_si256(_mm256_and_si256(a, low), _mm256_and_si256(neg, low));
  const __m256i above = _mm256_cmpgt_epi32(mant, _mm256_and_si256(e, low));  // (23-bit values)
  return _mm256_sub_epi32(_mm256_srli_epi32(e, 23), above);  // above is -1 where true
}

FUSEDOPS_AVX2 inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Dequantized (or fp32) state of 8 lanes at i.
FUSEDOPS_AVX2 inline __m256 load_state8(const void* s, bool f32, int64_t at, const float* code, float absmax) {
  if (f32) return _mm256_loadu_ps(static_cast<const float*>(s) + at);
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(s) + at)));
  return mul(_mm256_i32gather_ps(code, idx, 4), splat(absmax));
}

// The 8-bit state of a block: its codes under the block's absmax (normalise, quantize).
FUSEDOPS_AVX2 inline void store_codes(void* s, int64_t begin, const float* x, float absmax, const uint32_t* table) {
  uint8_t* out = static_cast<uint8_t*>(s) + begin;
  const __m256 am = splat(absmax);
  for (int i = 0; i < kQBlock; i += 8) {
    const __m256 xn = absmax == 0.f ? _mm256_setzero_ps() : _mm256_div_ps(_mm256_loadu_ps(x + i), am);
    const __m256i codes = quantize8(xn, table);  // 0..255: packing keeps them exactly
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w16, w16));
  }
}

template <int64_t K, typename T>
FUSEDOPS_AVX2 void step_block_avx2(const StepTensor& t, int64_t b, const float* qm, const Hyper& h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t begin = b * kQBlock;
  T* p = static_cast<T*>(t.p) + begin;
  const T* g = static_cast<const T*>(t.g) + begin;
  const bool f1 = t.flags & kState1F32, f2 = t.flags & kState2F32;
  const float a1 = f1 ? 0.f : t.a1[b], a2 = (kTwo && !f2) ? t.a2[b] : 0.f;
  const uint32_t key = kBf16 && h.sr ? sr_tensor_key(h.sr_key, t.index) : 0u;
  alignas(32) float mbuf[kQBlock], vbuf[kQBlock];  // the new 8-bit states before quantization
  // the new states: fp32 states in place (each lane's load precedes its store), else the buffers
  float* m = f1 ? static_cast<float*>(t.s1) + begin : mbuf;
  float* v = !kTwo ? vbuf : (f2 ? static_cast<float*>(t.s2) + begin : vbuf);
  const Hyper8 h8 = hyper8(h);
  const __m256 sign = splat(-0.f);
  __m256 max1 = _mm256_setzero_ps(), max2 = _mm256_setzero_ps();
  for (int i = 0; i < kQBlock; i += 8) {
    __m256 pi = avx2::load8(p + i), mi = load_state8(t.s1, f1, begin + i, qm + kSignedCode, a1);
    __m256 vi = kTwo ? load_state8(t.s2, f2, begin + i, qm + kUnsignedCode, a2) : _mm256_setzero_ps();
    update8<K>(pi, avx2::load8(g + i), mi, vi, h8);
    if (kBf16 && h.sr) pi = round_bf16_stochastic8(pi, key, begin + i);
    avx2::store8(p + i, pi);
    _mm256_storeu_ps(m + i, mi);
    max1 = _mm256_max_ps(_mm256_andnot_ps(sign, mi), max1);  // (a NaN lane keeps max1, as std::max)
    if constexpr (kTwo) {
      _mm256_storeu_ps(v + i, vi);
      max2 = _mm256_max_ps(_mm256_andnot_ps(sign, vi), max2);
    }
  }
  if (!f1) {
    t.a1[b] = hmax8(max1);
    store_codes(t.s1, begin, m, t.a1[b], tables(qm, true));
  }
  if (kTwo && !f2) {
    t.a2[b] = hmax8(max2);
    store_codes(t.s2, begin, v, t.a2[b], tables(qm, false));
  }
}
#endif

template <int64_t K, typename T>
void run(const std::vector<StepTensor>& ts, const float* qm, const Hyper& h) {
  std::vector<int64_t> first{0};  // first block of each tensor (prefix sums)
  for (const auto& t : ts) first.push_back(first.back() + blocks_of(t.n));
  const int64_t total = first.back();
  if (total == 0) return;
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  const bool vector = avx2::available();
#endif
  torch::stable::parallel_for(0, total, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
#ifdef FUSEDOPS_HAVE_AVX2_PATH
      if (vector && (b - first[t] + 1) * kQBlock <= ts[t].n) {  // a whole block
        step_block_avx2<K, T>(ts[t], b - first[t], qm, h);
        continue;
      }
#endif
      step_block<K, T>(ts[t], b - first[t], qm, h);
    }
  });
}

void optim8bit_step_(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> state1,
                     std::vector<Tensor> absmax1, std::vector<Tensor> state2, std::vector<Tensor> absmax2,
                     Tensor qmaps, int64_t kind, double lr, double beta1, double omb1, double beta2, double omb2,
                     double eps, double wd, double decay, double step_size, double inv_bc2_sqrt, bool first,
                     bool nesterov, int64_t sr_key) {
  STD_TORCH_CHECK(kind >= kAdamW && kind <= kSGD, "fusedops_C::optim8bit_step_: unknown kind ", kind);
  const bool two = kind == kAdamW || kind == kAdam;
  const auto ts = collect(params, grads, state1, absmax1, state2, absmax2, two);
  if (ts.empty()) return;
  STD_TORCH_CHECK(params[0].is_cpu(), "fusedops_C::optim8bit_step_ (CPU): params must be CPU tensors");
  STD_TORCH_CHECK(qmaps.is_cpu() && qmaps.scalar_type() == ScalarType::Float && qmaps.numel() == kQmapsNumel &&
                      qmaps.is_contiguous(),
                  "fusedops_C::optim8bit_step_: qmaps must be a contiguous float32 CPU tensor of ", kQmapsNumel, " elements");
  const float* qm = qmaps.const_data_ptr<float>();
  const Hyper h = make_hyper(lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt, first, nesterov, sr_key);
  dispatch_float(params[0].scalar_type(), "params", [&]<typename T>() {
    switch (kind) {
      case kAdamW: run<kAdamW, T>(ts, qm, h); break;
      case kAdam: run<kAdam, T>(ts, qm, h); break;
      case kLion: run<kLion, T>(ts, qm, h); break;
      default: run<kSGD, T>(ts, qm, h); break;
    }
  });
}

void optim8bit_codes_(Tensor x, Tensor out, Tensor qmaps, bool is_signed) {
  const int64_t n = check_codes(x, out, qmaps);
  STD_TORCH_CHECK(x.is_cpu(), "fusedops_C::optim8bit_codes_ (CPU): x must be a CPU tensor");
  const float* xs = x.const_data_ptr<float>();
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  const uint32_t* table = tables(qmaps.const_data_ptr<float>(), is_signed);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<uint8_t>(quantize(xs[i], table));
}

}  // namespace
}  // namespace optim8bit
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) {
  m.impl("optim8bit_step_", TORCH_BOX(&fusedops::optim8bit::optim8bit_step_));
  m.impl("optim8bit_codes_", TORCH_BOX(&fusedops::optim8bit::optim8bit_codes_));
}
