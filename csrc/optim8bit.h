// 8-bit optimizer step: the per-element math and the quantization search, shared by the
// C++ CPU kernel and the CUDA C++ kernel so that both follow one operation order.
//
// Every multiply, add, divide and sqrt is a separately rounded fp32 operation (on the
// device through the _rn intrinsics, which nvcc never contracts into an fma), in the
// order of fusedops.reference.optimizer_update_fp32: the two native backends and the
// eager reference give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline
#endif

namespace fusedops {
namespace optim8bit {

enum Kind : int64_t { kAdamW = 0, kAdam = 1, kLion = 2, kSGD = 3 };

constexpr int kQBlock = 256;      // elements per quantization block (bnb's block size)
constexpr int kSignedZero = 127;  // index of 0.0 in the signed dynamic map

// Layout of the fp32 qmaps tensor (fusedops/ops/optim8bit.py qmaps): signed code, its 255
// midpoints (+1 padding), unsigned code, its midpoints (+1 padding), then the bucket tables
// of the quantizer (quantize below) for the signed and for the unsigned map: 2 * kBuckets
// uint32 entries each (stored as their bits), first for x >= 0, then for x < 0.
constexpr int kBucketShift = 16;                    // |x| bits >> 16: exponent + 7 mantissa bits
constexpr int kBucketBase = (104 << 7) - 1;         // key of bucket 0 (|x| < 2^-23, no midpoints)
constexpr int kBuckets = (127 << 7) - kBucketBase + 1;  // 2946 per sign; the last one: |x| >= 1
constexpr int kSignedCode = 0, kSignedMids = 256, kUnsignedCode = 512, kUnsignedMids = 768;
constexpr int kSignedTable = 1024, kUnsignedTable = 1024 + 2 * kBuckets, kQmapsNumel = 1024 + 4 * kBuckets;

// Table flags per tensor: its first / second state is a plain fp32 state (32-bit states).
constexpr int64_t kState1F32 = 1, kState2F32 = 2;

struct Hyper {
  float lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt;
  bool first, nesterov;
  bool sr;          // stochastic rounding of bf16 params
  uint32_t sr_key;  // its key for this step (fusedops.reference.sr_key(seed, step))
};

FO_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FO_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FO_HD float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FO_HD float fsqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
FO_HD bool finite(float x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// One element: p, m (and v for Adam) updated in place from g. NaN/Inf g: m = v = 0 and p
// unchanged (the element's update is skipped and its state reset).
template <int64_t K>
FO_HD void update(float& p, float g, float& m, float& v, const Hyper& h) {
  if (!finite(g)) {
    m = 0.f;
    v = 0.f;
    return;
  }
  if constexpr (K == kAdamW || K == kAdam) {
    if constexpr (K == kAdamW) p = fmul(p, h.decay);
    else g = fadd(g, fmul(h.wd, p));
    m = fadd(fmul(h.beta1, m), fmul(h.omb1, g));
    v = fadd(fmul(h.beta2, v), fmul(h.omb2, fmul(g, g)));
    const float denom = fadd(fmul(fsqrt(v), h.inv_bc2_sqrt), h.eps);
    p = fadd(p, fmul(-h.step_size, fdiv(m, denom)));
  } else if constexpr (K == kLion) {
    p = fmul(p, h.decay);
    const float c = fadd(fmul(h.beta1, m), fmul(h.omb1, g));
    const float u = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
    p = fadd(p, fmul(-h.lr, u));
    m = fadd(fmul(h.beta2, m), fmul(h.omb2, g));
  } else {  // SGD; beta1 = momentum, omb2 = 1 - dampening
    g = fadd(g, fmul(h.wd, p));
    m = h.first ? g : fadd(fmul(h.beta1, m), fmul(h.omb2, g));
    const float d = h.nesterov ? fadd(g, fmul(h.beta1, m)) : m;
    p = fadd(p, fmul(-h.lr, d));
  }
}

FO_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// Code of x (a state scaled by its block's absmax): the number of midpoints strictly below
// x (ties to the lower code), and for the signed map bnb's sign rule (a negative x never
// takes the code of 0). One table lookup and one integer comparison: the bucket of |x|
// (key = bits >> 16, clamped to [kBucketBase, kBucketBase + kBuckets - 1]) holds at most
// one midpoint; its entry is (base << 23) | thr with base = the number of midpoints below
// the bucket and thr = that midpoint's mantissa (complemented in the half for x < 0, which
// also carries the sign rule; 0x7FFFFF when none). Exact for every float x (see
// fusedops.ops.optim8bit.bucket_table; -0.0 counts as >= 0).
FO_HD int quantize(float x, const uint32_t* table) {
  const uint32_t a = float_bits(x) & 0x7FFFFFFFu;
  const bool neg = x < 0.f;
  int k = static_cast<int>(a >> kBucketShift) - kBucketBase;
  k = k < 0 ? 0 : (k > kBuckets - 1 ? kBuckets - 1 : k);
  const uint32_t e = table[neg ? k + kBuckets : k];
  const uint32_t mant = (a & 0x7FFFFFu) ^ (neg ? 0x7FFFFFu : 0u);
  return static_cast<int>(e >> 23) + (mant > (e & 0x7FFFFFu) ? 1 : 0);
}

FO_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// Stochastic rounding of bf16 params: 16 random bits per element from a counter-based hash
// (murmur3's finaliser) of the step's key, the tensor's position in the step's lists and
// the element's index, the same on every backend (fusedops.reference.sr_bits).
FO_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}
FO_HD uint32_t sr_tensor_key(uint32_t key, int64_t index) {
  return fmix32(key ^ (static_cast<uint32_t>(index) * 0x632BE5ABu));
}
FO_HD uint32_t sr_bits(uint32_t tensor_key, int64_t element) {
  return fmix32(tensor_key + static_cast<uint32_t>(element) * 0x9E3779B9u);
}
// x rounded to a bf16 value (returned as the fp32 of it): up with probability (distance to
// the lower neighbour) / (gap), by adding 16 random bits below bf16's last bit and
// truncating. Inf and NaN are returned as they are.
FO_HD float round_bf16_stochastic(float x, uint32_t rnd) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7F800000u) == 0x7F800000u) return x;
  return bits_float((b + (rnd & 0xFFFFu)) & 0xFFFF0000u);
}

// x / absmax, with an all-zero block (absmax 0) giving 0.
FO_HD float normalise(float x, float absmax) { return absmax == 0.f ? 0.f : fdiv(x, absmax); }

}  // namespace optim8bit
}  // namespace fusedops
