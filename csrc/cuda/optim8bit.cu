// 8-bit optimizer step on CUDA tensors: every tensor of the step in one launch.
//
// Persistent CTAs: the grid is at most (resident CTAs per SM) x (SMs); a warp handles one
// quantization block of 256 elements at a time (8 contiguous elements per lane, 16- and
// 8-byte accesses when aligned) and walks the blocks of all tensors in grid-stride order.
// Each CTA copies the code maps and the quantizer's bucket tables into shared memory once.
// Per block: dequantize both states (code[c] * absmax), fp32 update (csrc/optim8bit.h:
// the same operation order as the C++ CPU kernel and the reference, every op separately
// rounded), block absmax by warp shuffles, requantize with one bucket-table lookup per
// element (the codes of csrc/optim8bit.h quantize).
//
// The AdamW / Adam kernel (two 8-bit states; every param dtype) is built for
// __launch_bounds__(256, 4) (64 registers) and gives the same bits as the general forms:
// - the unsigned (second-state) bucket table's x < 0 half stays out of shared memory
//   (37 KB per CTA instead of 49 KB): for the unsigned map that half is all code 0;
// - the tables in shared memory hold the thresholds complemented, so a lookup's code is
//   (entry + mantissa) >> 23 (quantize_c);
// - a tensor whose pointers are all aligned and whose states are 8-bit is marked once on the
//   host (kHot); a full block of it (a hot block) is loaded with no per-lane length or
//   alignment checks and updated with no branch per element (adam8);
// - normalisation checks the block absmax's range once per block and each element with one
//   integer min per lane (normalise8).
// Everything else (tails, misaligned tensors, 32-bit states, blocks whose absmax is 0,
// subnormal or infinite, NaN / Inf) takes the general per-element path of the same kernel.
// Lion and SGD (one state) use the general forms throughout, __launch_bounds__(256, 5).
//
// The table of tensors travels as a __grid_constant__ kernel parameter (CUDA >= 12.1,
// sm_70+): no host-to-device copy, nothing to synchronise, capturable in a CUDA graph.
// lr, step and the other scalars are plain kernel arguments: changing them compiles nothing.
#include "cuda_utils.cuh"
#include "../optim8bit_tensors.h"

#include <type_traits>
#include <vector>

namespace fusedops {
namespace optim8bit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPer = kQBlock / 32;  // 8 elements per lane
constexpr int kMaxTensors = 320;    // 320 * 72 B + prefix sums: within the 32 KB parameter space

struct StepTable {
  StepTensor t[kMaxTensors];
  int64_t first[kMaxTensors + 1];  // first quantization block of each tensor (prefix sums)
  int count;
};

constexpr int64_t kHot = 1 << 8;  // StepTensor.flags bit set by this file: a hot tensor (hot_tensor)

template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&out)[kPer], int len, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
#pragma unroll
    for (int k = 0; k < kPer / V; ++k) {
      const Packed<T, V> pk = reinterpret_cast<const Packed<T, V>*>(src)[k];
#pragma unroll
      for (int j = 0; j < V; ++j) out[k * V + j] = static_cast<float>(pk.v[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[i] = i < len ? static_cast<float>(src[i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&in)[kPer], int len, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec) {
#pragma unroll
    for (int k = 0; k < kPer / V; ++k) {
      Packed<T, V> pk;
#pragma unroll
      for (int j = 0; j < V; ++j) pk.v[j] = static_cast<T>(in[k * V + j]);
      reinterpret_cast<Packed<T, V>*>(dst)[k] = pk;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (i < len) dst[i] = static_cast<T>(in[i]);
  }
}

__device__ __forceinline__ void load_codes(const uint8_t* src, int (&c)[kPer], int len, bool vec, int pad) {
  if (vec) {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      c[i] = (w.x >> (8 * i)) & 0xFF;
      c[4 + i] = (w.y >> (8 * i)) & 0xFF;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) c[i] = i < len ? src[i] : pad;
  }
}

__device__ __forceinline__ void store_codes(uint8_t* dst, const int (&c)[kPer], int len, bool vec) {
  if (vec) {
    uint2 w{0u, 0u};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w.x |= static_cast<unsigned>(c[i]) << (8 * i);
      w.y |= static_cast<unsigned>(c[4 + i]) << (8 * i);
    }
    *reinterpret_cast<uint2*>(dst) = w;
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (i < len) dst[i] = static_cast<uint8_t>(c[i]);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Loads one state of 8 elements: fp32 (32-bit state) or codes * absmax.
__device__ __forceinline__ void load_state(const StepTensor& t, bool f32, const void* s, const float* a, int64_t b,
                                           int64_t e0, int len, bool vec, const float* code, int pad,
                                           float (&out)[kPer]) {
  if (f32) {
    load8(static_cast<const float*>(s) + e0, out, len, vec && aligned_to(static_cast<const float*>(s) + e0, 16));
  } else {
    int c[kPer];
    load_codes(static_cast<const uint8_t*>(s) + e0, c, len, vec && aligned_to(static_cast<const uint8_t*>(s) + e0, 8),
               pad);
    const float am = a[b];
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[i] = fmul(code[c[i]], am);
  }
}

// x / b for one b > 0 and many x, correctly rounded (= __fdiv_rn) with the reciprocal
// computed once: the fast path of nvcc's IEEE division (y0 = MUFU.RCP(b), one Newton step
// y = y0 + y0 (1 - b y0), q0 = x y, r = x - b q0 exact by an fma, q = q0 + r y) is correctly
// rounded whenever no intermediate leaves the normal range; nvcc guards it per division by
// a range check (FCHK) and a slow path. Here the range is checked conservatively (b in
// [2^-60, 2^60], |x| in [max(b 2^-50, 2^-90), b 2^50]: quotient within 2^+-50, |x| and the
// remainder normal) and anything else takes __fdiv_rn. x = +-0 takes the fast path too:
// it gives +0 for -0 / b (IEEE: -0), which quantizes to the same code. (With b out of range,
// e.g. subnormal or infinite, the reciprocal is 0, inf or NaN: then 0 goes the slow way too.)
struct BlockDiv {
  float b, y, lo, hi;

  __device__ __forceinline__ explicit BlockDiv(float b_) : b(b_) {
    float y0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(b));
    y = __fmaf_rn(y0, __fmaf_rn(-b, y0, 1.f), y0);
    const bool ok = b >= 0x1p-60f && b <= 0x1p60f;
    lo = fmaxf(__fmul_rn(b, 0x1p-50f), 0x1p-90f);
    hi = ok ? __fmul_rn(b, 0x1p50f) : -INFINITY;  // !ok: every x goes the slow way, 0 included
  }
  __device__ __forceinline__ bool fast(float x) const {
    const float a = fabsf(x);
    return a <= hi && (a >= lo || x == 0.f);
  }
  __device__ __forceinline__ float quotient(float x) const {
    const float q0 = __fmul_rn(x, y);
    return __fmaf_rn(y, __fmaf_rn(-q0, b, x), q0);
  }
};

// Normalises a lane's 8 elements by the block absmax (normalise() of csrc/optim8bit.h).
// kNorm (AdamW / Adam): the same quotients with cheaper checks. |x| <= mx for every element
// that is not NaN (mx is the block's max of |x|), so BlockDiv's upper bound never fails when
// mx is in range: the range of mx is checked once per block (warp-uniform; out of range: every
// element by __fdiv_rn), and per element only "x == 0 or |x| >= lo", as one unsigned
// compare of 2 * bits(x) - 2 (mod 2^32: drops the sign, maps +-0 to 0xFFFFFFFE and orders
// every other |x| as its value) against 2 * bits(lo) - 2, through one min per lane. A NaN x
// then takes the fast path, which gives a NaN as __fdiv_rn does; quantize maps every NaN
// to the same code (the last bucket, no midpoint), so the codes are the same.
template <bool kNorm>
__device__ __forceinline__ void normalise8(const float (&x)[kPer], float mx, float (&q)[kPer]) {
  if (mx == 0.f) {  // warp-uniform: an all-zero block
#pragma unroll
    for (int i = 0; i < kPer; ++i) q[i] = 0.f;
    return;
  }
  if constexpr (kNorm) {
    if (!(mx >= 0x1p-60f && mx <= 0x1p60f)) {  // warp-uniform
#pragma unroll
      for (int i = 0; i < kPer; ++i) q[i] = fdiv(x[i], mx);
      return;
    }
    const BlockDiv d(mx);
    const uint32_t lo2 = 2u * float_bits(d.lo) - 2u;
    uint32_t low = 0xFFFFFFFFu;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      q[i] = d.quotient(x[i]);
      low = min(low, 2u * float_bits(x[i]) - 2u);
    }
    if (low < lo2) {
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (2u * float_bits(x[i]) - 2u < lo2) q[i] = fdiv(x[i], mx);
    }
  } else {
    const BlockDiv d(mx);
    bool slow = false;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      q[i] = d.quotient(x[i]);
      slow = slow || !d.fast(x[i]);
    }
    if (slow) {
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (!d.fast(x[i])) q[i] = fdiv(x[i], mx);
    }
  }
}

// quantize (csrc/optim8bit.h) on a table whose entries hold thr complemented,
// e' = e ^ 0x7FFFFF = (base << 23) | (0x7FFFFF - thr) (made when the table is copied to
// shared memory): base + (mant' > thr) = (e' + mant') >> 23, as e' + mant' carries into bit
// 23 exactly when mant' - thr >= 1 (both < 2^23, so at most one carry), and base + 1 <= 256.
// The lookup index as in quantize; the key is clamped to [kBucketBase, kBucketBase +
// kBuckets - 1] and the table addressed from kBucketBase (one add less).
__device__ __forceinline__ int quantize_c(float x, const uint32_t* table) {
  const uint32_t a = float_bits(x) & 0x7FFFFFFFu;
  const bool neg = x < 0.f;
  int key = static_cast<int>(a >> kBucketShift);
  key = key < kBucketBase ? kBucketBase : (key > kBucketBase + kBuckets - 1 ? kBucketBase + kBuckets - 1 : key);
  const uint32_t e = table[(neg ? key + kBuckets : key) - kBucketBase];
  const uint32_t mant = (a ^ (neg ? 0x7FFFFFu : 0u)) & 0x7FFFFFu;
  return static_cast<int>((e + mant) >> 23);
}
// quantize of the unsigned map from the x >= 0 half of its complemented table only: the
// x < 0 half of the unsigned map's table is all (0 << 23) | 0x7FFFFF (no midpoint is
// negative), i.e. code 0 for every x < 0. -0.0 and NaN (x < 0 false) take the x >= 0 half as
// in quantize. (|x| is still needed for the key: -0.0 takes bucket 0.)
__device__ __forceinline__ int quantize_unsigned_half_c(float x, const uint32_t* table) {
  const uint32_t a = float_bits(x) & 0x7FFFFFFFu;
  const uint32_t k = a >> kBucketShift;
  const int key = k < static_cast<uint32_t>(kBucketBase)
                      ? kBucketBase
                      : (k > static_cast<uint32_t>(kBucketBase + kBuckets - 1) ? kBucketBase + kBuckets - 1
                                                                               : static_cast<int>(k));
  const uint32_t e = table[key - kBucketBase];
  return x < 0.f ? 0 : static_cast<int>((e + (a & 0x7FFFFFu)) >> 23);
}

// kLean: the AdamW / Adam forms (normalise8<true>, quantize_c; kHalfU: the unsigned map on
// the x >= 0 half of its table). known_aligned: the caller knows s + e0 is 8-byte aligned (a
// hot tensor).
template <bool kLean, bool kHalfU>
__device__ __forceinline__ void store_state(bool f32, void* s, float* a, int64_t b, int64_t e0, int len, bool vec,
                                            bool known_aligned, const uint32_t* buckets, int lane,
                                            const float (&x)[kPer]) {
  if (f32) {
    store8(static_cast<float*>(s) + e0, x, len, vec && aligned_to(static_cast<float*>(s) + e0, 16));
    return;
  }
  float mx = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) mx = fmaxf(mx, fabsf(x[i]));  // padding lanes hold 0
  mx = warp_max(mx);
  float q[kPer];
  normalise8<kLean>(x, mx, q);
  int c[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if constexpr (kLean) {
      c[i] = kHalfU ? quantize_unsigned_half_c(q[i], buckets) : quantize_c(q[i], buckets);
    } else {
      c[i] = quantize(q[i], buckets);
    }
  }
  store_codes(static_cast<uint8_t*>(s) + e0, c, len,
              vec && (known_aligned || aligned_to(static_cast<uint8_t*>(s) + e0, 8)));
  if (lane == 0) a[b] = mx;
}

// Shared memory: the code maps (signed, then unsigned for two-state kinds) and the bucket
// tables (signed, then for two-state kinds the x >= 0 half of the unsigned one, rounded up
// to 4 entries), copied from qmaps once per CTA.
template <bool kTwo>
constexpr int smem_floats() {
  return kTwo ? 512 + (3 * kBuckets + 3) / 4 * 4 : 256 + 2 * kBuckets;
}

template <int64_t K>
constexpr bool two_states() {
  return K == kAdamW || K == kAdam;
}

// A hot block: a full block of a tensor marked kHot (aligned pointers, 8-bit states).
__device__ __forceinline__ bool hot_block(const StepTensor& t, int64_t b) {
  return (t.flags & kHot) && (b + 1) * kQBlock <= t.n;
}

// A lane's raw data of a hot block: p and g as 16-byte words, the packed codes, the absmax.
template <typename T>
struct Raw {
  static constexpr int kWords = kPer * static_cast<int>(sizeof(T)) / 16;
  uint4 p[kWords], g[kWords];
  uint2 c1, c2;
  float a1, a2;
};

template <typename T>
__device__ __forceinline__ void fetch(const StepTensor& t, int64_t b, int lane, Raw<T>& r) {
  const int64_t e0 = b * kQBlock + lane * kPer;
  const uint4* p4 = reinterpret_cast<const uint4*>(static_cast<const T*>(t.p) + e0);
  const uint4* g4 = reinterpret_cast<const uint4*>(static_cast<const T*>(t.g) + e0);
#pragma unroll
  for (int k = 0; k < Raw<T>::kWords; ++k) {
    r.p[k] = p4[k];
    r.g[k] = g4[k];
  }
  r.c1 = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(t.s1) + e0);
  r.a1 = t.a1[b];
  r.c2 = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(t.s2) + e0);
  r.a2 = t.a2[b];
}

template <typename T>
__device__ __forceinline__ void unpack_words(const uint4 (&w)[Raw<T>::kWords], float (&out)[kPer]) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < Raw<T>::kWords; ++k) {
    Packed<T, V> pk;
    static_assert(sizeof(pk) == sizeof(uint4));
    memcpy(&pk, &w[k], sizeof pk);
#pragma unroll
    for (int j = 0; j < V; ++j) out[k * V + j] = static_cast<float>(pk.v[j]);
  }
}

__device__ __forceinline__ void dequant(uint2 w, float am, const float* code, float (&out)[kPer]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = fmul(code[(w.x >> (8 * i)) & 0xFF], am);
    out[4 + i] = fmul(code[(w.y >> (8 * i)) & 0xFF], am);
  }
}

// The values of a hot block from its raw data (the same operations as load8 / load_state).
template <typename T>
__device__ __forceinline__ void unpack(const Raw<T>& r, const float* sm, float (&p)[kPer], float (&g)[kPer],
                                       float (&m)[kPer], float (&v)[kPer]) {
  unpack_words<T>(r.p, p);
  unpack_words<T>(r.g, g);
  dequant(r.c1, r.a1, sm, m);
  dequant(r.c2, r.a2, sm + 256, v);
}

// sqrt(v) correctly rounded (= __fsqrt_rn), for v in the range where nvcc's own sqrt.rn
// takes its fast path: ptxas expands __fsqrt_rn into y = MUFU.RSQ(v), s = v * y (ftz),
// h = 0.5 y (ftz), s + (v - s s) h (two fmas), and takes a slow path when bits(v) -
// 0x0D000000 > 0x727FFFFF (unsigned: v not in [2^-101, FLT_MAX], 0 and negatives
// included). The same instructions here give the same bits there; the check is done by the
// caller, once per lane for 8 elements, and anything out of range goes to __fsqrt_rn.
__device__ __forceinline__ bool sqrt_fast_ok(float v) { return float_bits(v) - 0x0D000000u <= 0x727FFFFFu; }
__device__ __forceinline__ float sqrt_fast(float v) {
  float y, s, hy;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(s) : "f"(v), "f"(y));
  asm("mul.ftz.f32 %0, %1, 0f3F000000;" : "=f"(hy) : "f"(y));
  const float r = __fmaf_rn(-s, s, v);
  return __fmaf_rn(r, hy, s);
}

// update<K> (csrc/optim8bit.h) of Adam / AdamW for the 8 elements of a hot block, the same
// operations in the same order: non-finite g computed like the others and then discarded by
// selects (m = v = 0, p kept) instead of a branch per element, and the sqrt's range check
// once per lane (sqrt_fast) instead of a branch per element.
template <int64_t K>
__device__ __forceinline__ void adam8(float (&p)[kPer], const float (&g)[kPer], float (&m)[kPer], float (&v)[kPer],
                                      const Hyper& h) {
  float s[kPer];
  uint32_t fin = 0;  // bit i: g[i] finite
  bool ok = true;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const bool f = finite(g[i]);
    fin |= f ? 1u << i : 0u;
    float gi = g[i], pi = p[i];
    if constexpr (K == kAdamW) pi = fmul(pi, h.decay);
    else gi = fadd(gi, fmul(h.wd, pi));
    const float mi = fadd(fmul(h.beta1, m[i]), fmul(h.omb1, gi));
    const float vi = fadd(fmul(h.beta2, v[i]), fmul(h.omb2, fmul(gi, gi)));
    p[i] = f ? pi : p[i];  // the decayed p (AdamW) or p, kept as it is for a non-finite g
    m[i] = f ? mi : 0.f;
    v[i] = f ? vi : 0.f;
    s[i] = sqrt_fast(v[i]);
    ok = ok && sqrt_fast_ok(v[i]);
  }
  if (!ok) {  // a v out of the fast range (0 included: a zero grad on a zero state, a non-finite g)
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (!sqrt_fast_ok(v[i])) s[i] = fsqrt(v[i]);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const float denom = fadd(fmul(s[i], h.inv_bc2_sqrt), h.eps);
    const float pi = fadd(p[i], fmul(-h.step_size, fdiv(m[i], denom)));
    p[i] = (fin >> i) & 1u ? pi : p[i];
  }
}

// The update and the stores of one block, its values loaded. kHotBlock: a hot block (len = 8,
// every access vectorised, 8-bit states).
template <int64_t K, typename T, bool kHotBlock>
__device__ __forceinline__ void step_finish(const StepTensor& t, int64_t b, int lane, const float* sm,
                                            const Hyper& h, int len, float (&p)[kPer], float (&g)[kPer],
                                            float (&m)[kPer], float (&v)[kPer]) {
  constexpr bool kTwo = two_states<K>();
  static_assert(!kHotBlock || kTwo, "hot blocks are AdamW / Adam only");
  const uint32_t* tab1 = reinterpret_cast<const uint32_t*>(sm + (kTwo ? 512 : 256));
  const uint32_t* tab2 = tab1 + 2 * kBuckets;
  const int64_t e0 = b * kQBlock + lane * kPer;
  const bool full = kHotBlock || len == kPer;
  const bool f1 = !kHotBlock && (t.flags & kState1F32), f2 = !kHotBlock && (t.flags & kState2F32);
  if constexpr (kHotBlock) {
    adam8<K>(p, g, m, v, h);
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      float vi = kTwo ? v[i] : 0.f;
      if (i < len) {
        update<K>(p[i], g[i], m[i], vi, h);
      } else {
        m[i] = 0.f;
        vi = 0.f;
      }
      v[i] = vi;
    }
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (h.sr) {  // stochastic rounding: p becomes a bf16 value (the store's conversion is exact)
      const uint32_t key = sr_tensor_key(h.sr_key, t.index);
#pragma unroll
      for (int i = 0; i < kPer; ++i) p[i] = round_bf16_stochastic(p[i], sr_bits(key, e0 + i));
    }
  }
  T* pp = static_cast<T*>(t.p) + e0;
  store8(pp, p, len, full && (kHotBlock || aligned_to(pp, 16)));
  store_state<kTwo, false>(f1, t.s1, t.a1, b, e0, len, full, kHotBlock, tab1, lane, m);
  if constexpr (kTwo) {
    store_state<true, true>(f2, t.s2, t.a2, b, e0, len, full, kHotBlock, tab2, lane, v);
  }
}

// One quantization block `b` of tensor `t` by one warp: a hot block of AdamW / Adam by the
// hot path, any other by the general one.
template <int64_t K, typename T>
__device__ __forceinline__ void step_block(const StepTensor& t, int64_t b, int lane, const float* sm, const Hyper& h) {
  constexpr bool kTwo = two_states<K>();
  float p[kPer], g[kPer], m[kPer], v[kPer];
  if constexpr (kTwo) {
    if (hot_block(t, b)) {  // warp-uniform
      Raw<T> r;
      fetch<T>(t, b, lane, r);
      unpack<T>(r, sm, p, g, m, v);
      step_finish<K, T, true>(t, b, lane, sm, h, kPer, p, g, m, v);
      return;
    }
  }
  const float* code1 = sm;
  const float* code2 = sm + 256;
  const int64_t e0 = b * kQBlock + lane * kPer;
  const int64_t rest = t.n - e0;
  const int len = rest <= 0 ? 0 : (rest >= kPer ? kPer : static_cast<int>(rest));
  const bool full = len == kPer;
  const bool f1 = t.flags & kState1F32, f2 = t.flags & kState2F32;
  T* pp = static_cast<T*>(t.p) + e0;
  const T* gp = static_cast<const T*>(t.g) + e0;
  load8(pp, p, len, full && aligned_to(pp, 16));
  load8(gp, g, len, full && aligned_to(gp, 16));
  load_state(t, f1, t.s1, t.a1, b, e0, len, full, code1, kSignedZero, m);
  if constexpr (kTwo) load_state(t, f2, t.s2, t.a2, b, e0, len, full, code2, 0, v);
  step_finish<K, T, false>(t, b, lane, sm, h, len, p, g, m, v);
}

// Resident CTAs per SM the registers are budgeted for: AdamW / Adam 4 (64 registers; 37 KB
// of shared memory per CTA), Lion / SGD 5.
template <int64_t K>
constexpr int min_ctas() {
  return two_states<K>() ? 4 : 5;
}

template <int64_t K, typename T>
__global__ void __launch_bounds__(kThreads, min_ctas<K>())
optim8bit_kernel(const __grid_constant__ StepTable table, const float* __restrict__ qmaps, const Hyper h) {
  constexpr bool kTwo = two_states<K>();
  extern __shared__ float4 sm4[];
  float* sm = reinterpret_cast<float*>(sm4);
  {
    // codes: qmaps[0, 256) (+ [512, 768)); tables: qmaps[1024, 1024 + the tables' floats)
    const float4* q4 = reinterpret_cast<const float4*>(qmaps);
    constexpr int kCodes = kTwo ? 512 : 256;
    constexpr int kCode4 = kCodes / 4, kTab4 = (smem_floats<kTwo>() - kCodes) / 4;
    for (int i = threadIdx.x; i < kCode4; i += kThreads) sm4[i] = q4[i < 64 ? i : i + 64];
    for (int i = threadIdx.x; i < kTab4; i += kThreads) {
      float4 e = q4[kSignedTable / 4 + i];
      if constexpr (kTwo) {  // thr complemented (quantize_c)
        auto c = [](float w) { return __uint_as_float(__float_as_uint(w) ^ 0x7FFFFFu); };
        e = make_float4(c(e.x), c(e.y), c(e.z), c(e.w));
      }
      sm4[kCode4 + i] = e;
    }
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t total = table.first[table.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  int t = 0;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; u < total; u += stride) {
    while (u >= table.first[t + 1]) ++t;
    step_block<K, T>(table.t[t], u - table.first[t], lane, sm, h);
  }
}

// Grid of a launch: at most the CTAs that are resident at once (queried once per device
// and kernel), fewer when the work is smaller.
template <int64_t K, typename T>
int64_t persistent_ctas(int32_t device, int64_t blocks) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  const size_t smem = sizeof(float) * smem_floats<two_states<K>()>();
  int& resident = cached[device < kMaxDevices ? device : 0];
  if (resident == 0 || device >= kMaxDevices) {
    auto kernel = optim8bit_kernel<K, T>;
    FUSEDOPS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    int per_sm = 0, sms = 0;
    FUSEDOPS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    FUSEDOPS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    resident = (per_sm > 0 ? per_sm : 1) * sms;
  }
  const int64_t needed = (blocks + kWarps - 1) / kWarps;
  return needed < resident ? needed : resident;
}

// A tensor of AdamW / Adam whose every access of a full block can be vectorised: 8-bit
// states, p and g 16-byte aligned, codes 8-byte aligned (e0 is a multiple of 8 elements, so
// p + e0 is as aligned as p).
bool hot_tensor(const StepTensor& st) {
  if (st.flags & (kState1F32 | kState2F32)) return false;
  return aligned_to(st.p, 16) && aligned_to(st.g, 16) && aligned_to(st.s1, 8) && aligned_to(st.s2, 8);
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
  STD_TORCH_CHECK(params[0].is_cuda(), "fusedops_C::optim8bit_step_ (CUDA): params must be CUDA tensors");
  const int32_t device = params[0].get_device_index();
  STD_TORCH_CHECK(qmaps.is_cuda() && qmaps.get_device_index() == device && qmaps.scalar_type() == ScalarType::Float &&
                      qmaps.numel() == kQmapsNumel && qmaps.is_contiguous() &&
                      aligned_to(qmaps.const_data_ptr(), 16),
                  "fusedops_C::optim8bit_step_: qmaps must be a contiguous, 16-byte aligned float32 tensor of ",
                  kQmapsNumel, " elements on the params' device");
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(device);
  const Hyper h = make_hyper(lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt, first, nesterov, sr_key);
  const float* qm = qmaps.const_data_ptr<float>();
  dispatch_float(params[0].scalar_type(), "params", [&]<typename T>() {
    auto launch_all = [&]<int64_t K>() {
      StepTable table{};
      auto launch = [&]() {
        const int64_t blocks = table.first[table.count];
        if (blocks == 0) return;
        const int64_t ctas = persistent_ctas<K, T>(device, blocks);
        optim8bit_kernel<K, T><<<static_cast<unsigned>(ctas), kThreads, sizeof(float) * smem_floats<two_states<K>()>(),
                                 stream>>>(table, qm, h);
        FUSEDOPS_CHECK_LAUNCH();
      };
      for (const StepTensor& st : ts) {
        if (table.count == kMaxTensors) {  // a full table goes out as its own launch
          launch();
          table.count = 0;
        }
        table.t[table.count] = st;
        if (two && hot_tensor(st)) table.t[table.count].flags |= kHot;
        table.first[table.count + 1] = table.first[table.count] + blocks_of(st.n);
        ++table.count;
      }
      if (table.count > 0) launch();
    };
    switch (kind) {
      case kAdamW: launch_all.template operator()<kAdamW>(); break;
      case kAdam: launch_all.template operator()<kAdam>(); break;
      case kLion: launch_all.template operator()<kLion>(); break;
      default: launch_all.template operator()<kSGD>(); break;
    }
  });
}

__global__ void codes_kernel(const float* __restrict__ x, uint8_t* __restrict__ out, int64_t n,
                             const uint32_t* __restrict__ table) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<uint8_t>(quantize(x[i], table));
}

void optim8bit_codes_(Tensor x, Tensor out, Tensor qmaps, bool is_signed) {
  const int64_t n = check_codes(x, out, qmaps);
  STD_TORCH_CHECK(x.is_cuda(), "fusedops_C::optim8bit_codes_ (CUDA): x must be a CUDA tensor");
  if (n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const uint32_t* table = reinterpret_cast<const uint32_t*>(qmaps.const_data_ptr<float>() +
                                                            (is_signed ? kSignedTable : kUnsignedTable));
  const int64_t ctas = (n + 255) / 256 < 65536 ? (n + 255) / 256 : 65536;
  codes_kernel<<<static_cast<unsigned>(ctas), 256, 0, current_stream(x.get_device_index())>>>(
      x.const_data_ptr<float>(), out.mutable_data_ptr<uint8_t>(), n, table);
  FUSEDOPS_CHECK_LAUNCH();
}

}  // namespace
}  // namespace optim8bit
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("optim8bit_step_", TORCH_BOX(&fusedops::optim8bit::optim8bit_step_));
  m.impl("optim8bit_codes_", TORCH_BOX(&fusedops::optim8bit::optim8bit_codes_));
}
