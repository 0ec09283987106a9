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

// Row layout of the [6, 256] fp32 qmaps tensor: signed code, its midpoints, unsigned code,
// its midpoints, then both midpoint lists in Eytzinger order (255 midpoints per list; the
// 256th entry is padding, never read).
constexpr int kSignedCode = 0, kSignedMids = 256, kUnsignedCode = 512, kUnsignedMids = 768;
constexpr int kSignedEytz = 1024, kUnsignedEytz = 1280, kQmapsNumel = 1536;

// Table flags per tensor: its first / second state is a plain fp32 state (32-bit states).
constexpr int64_t kState1F32 = 1, kState2F32 = 2;

struct Hyper {
  float lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt;
  bool first, nesterov;
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
    const float denom = fadd(fdiv(fsqrt(v), h.bc2_sqrt), h.eps);
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

// Code of x (a state scaled by its block's absmax, in [-1, 1]): the number of midpoints
// strictly below x (ties to the lower code), by an 8-step branchless binary search over
// the 255 sorted midpoints. Signed map: a negative x that lands on 0 takes the smallest
// negative code (bnb's sign rule).
template <bool kSigned>
FO_HD int quantize(float x, const float* mids) {
  int pos = 0;
#pragma unroll
  for (int s = 128; s >= 1; s >>= 1) pos += (mids[pos + s - 1] < x) ? s : 0;
  if constexpr (kSigned) {
    if (x < 0.f && pos == kSignedZero) pos = kSignedZero - 1;
  }
  return pos;
}

// The same code by descending the midpoints in Eytzinger order (node k's children at 2k+1
// and 2k+2): the leaf reached is 255 + (number of midpoints < x).
template <bool kSigned>
FO_HD int quantize_eytzinger(float x, const float* eytz) {
  int k = 0;
#pragma unroll
  for (int l = 0; l < 8; ++l) k = 2 * k + 1 + (eytz[k] < x ? 1 : 0);
  int pos = k - 255;
  if constexpr (kSigned) {
    if (x < 0.f && pos == kSignedZero) pos = kSignedZero - 1;
  }
  return pos;
}

// x / absmax, with an all-zero block (absmax 0) giving 0.
FO_HD float normalise(float x, float absmax) { return absmax == 0.f ? 0.f : fdiv(x, absmax); }

}  // namespace optim8bit
}  // namespace fusedops
