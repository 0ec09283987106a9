// 8-bit optimizer step on CUDA tensors: every tensor of the step in one launch.
//
// A warp per quantization block of 256 elements, 8 contiguous elements per lane (16- and
// 8-byte accesses when aligned), 8 warps per CTA. Per block: dequantize both states from
// the maps in shared memory, fp32 update (csrc/optim8bit.h: the same operation order as
// the C++ CPU kernel and the reference, every op separately rounded), block absmax by warp
// shuffles, requantize by an 8-level search over the midpoints in Eytzinger order.
//
// The table of tensors travels as a __grid_constant__ kernel parameter (CUDA >= 12.1,
// sm_70+): no host-to-device copy, nothing to synchronise, capturable in a CUDA graph.
// lr, step and the other scalars are plain kernel arguments: changing them compiles nothing.
#include "cuda_utils.cuh"
#include "../optim8bit_tensors.h"

#include <vector>

namespace fusedops {
namespace optim8bit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPer = kQBlock / 32;  // 8 elements per lane
constexpr int kMaxTensors = 320;    // 320 * 64 B + prefix sums: within the 32 KB parameter space

struct StepTable {
  StepTensor t[kMaxTensors];
  int64_t first[kMaxTensors + 1];  // first CTA of each tensor (prefix sums)
  int count;
};

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

template <bool kSigned>
__device__ __forceinline__ void store_state(bool f32, void* s, float* a, int64_t b, int64_t e0, int len, bool vec,
                                            const float* eytz, int lane, const float (&x)[kPer]) {
  if (f32) {
    store8(static_cast<float*>(s) + e0, x, len, vec && aligned_to(static_cast<float*>(s) + e0, 16));
    return;
  }
  float mx = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) mx = fmaxf(mx, fabsf(x[i]));  // padding lanes hold 0
  mx = warp_max(mx);
  int c[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) c[i] = quantize_eytzinger<kSigned>(normalise(x[i], mx), eytz);
  store_codes(static_cast<uint8_t*>(s) + e0, c, len, vec && aligned_to(static_cast<uint8_t*>(s) + e0, 8));
  if (lane == 0) a[b] = mx;
}

template <int64_t K, typename T>
__global__ void __launch_bounds__(kThreads)
optim8bit_kernel(const __grid_constant__ StepTable table, const float* __restrict__ qmaps, const Hyper h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  __shared__ float sm[kQmapsNumel];
  for (int i = threadIdx.x; i < kQmapsNumel; i += kThreads) sm[i] = qmaps[i];
  __syncthreads();

  const int64_t cta = blockIdx.x;
  int lo = 0, hi = table.count - 1;  // last tensor whose first CTA is <= cta
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first[mid] <= cta) lo = mid; else hi = mid - 1;
  }
  const StepTensor& t = table.t[lo];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = (cta - table.first[lo]) * kWarps + warp;  // quantization block in the tensor
  if (b * kQBlock >= t.n) return;  // no block barrier below this point
  const int64_t e0 = b * kQBlock + lane * kPer;
  const int64_t rest = t.n - e0;
  const int len = rest <= 0 ? 0 : (rest >= kPer ? kPer : static_cast<int>(rest));
  const bool full = len == kPer;
  const bool f1 = t.flags & kState1F32, f2 = t.flags & kState2F32;

  float p[kPer], g[kPer], m[kPer], v[kPer];
  T* pp = static_cast<T*>(t.p) + e0;
  const T* gp = static_cast<const T*>(t.g) + e0;
  load8(pp, p, len, full && aligned_to(pp, 16));
  load8(gp, g, len, full && aligned_to(gp, 16));
  load_state(t, f1, t.s1, t.a1, b, e0, len, full, sm + kSignedCode, kSignedZero, m);
  if constexpr (kTwo) load_state(t, f2, t.s2, t.a2, b, e0, len, full, sm + kUnsignedCode, 0, v);
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
  store8(pp, p, len, full && aligned_to(pp, 16));
  store_state<true>(f1, t.s1, t.a1, b, e0, len, full, sm + kSignedEytz, lane, m);
  if constexpr (kTwo) store_state<false>(f2, t.s2, t.a2, b, e0, len, full, sm + kUnsignedEytz, lane, v);
}

void optim8bit_step_(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> state1,
                     std::vector<Tensor> absmax1, std::vector<Tensor> state2, std::vector<Tensor> absmax2,
                     Tensor qmaps, int64_t kind, double lr, double beta1, double omb1, double beta2, double omb2,
                     double eps, double wd, double decay, double step_size, double bc2_sqrt, bool first,
                     bool nesterov) {
  STD_TORCH_CHECK(kind >= kAdamW && kind <= kSGD, "fusedops_C::optim8bit_step_: unknown kind ", kind);
  const bool two = kind == kAdamW || kind == kAdam;
  const auto ts = collect(params, grads, state1, absmax1, state2, absmax2, two);
  if (ts.empty()) return;
  STD_TORCH_CHECK(params[0].is_cuda(), "fusedops_C::optim8bit_step_ (CUDA): params must be CUDA tensors");
  const int32_t device = params[0].get_device_index();
  STD_TORCH_CHECK(qmaps.is_cuda() && qmaps.get_device_index() == device && qmaps.scalar_type() == ScalarType::Float &&
                      qmaps.numel() == kQmapsNumel && qmaps.is_contiguous(),
                  "fusedops_C::optim8bit_step_: qmaps must be a contiguous float32 [6, 256] tensor on the params' "
                  "device");
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(device);
  const Hyper h = make_hyper(lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt, first, nesterov);
  const float* qm = qmaps.const_data_ptr<float>();
  dispatch_float(params[0].scalar_type(), "params", [&]<typename T>() {
    auto launch_all = [&]<int64_t K>() {
      StepTable table{};
      auto launch = [&]() {
        const int64_t ctas = table.first[table.count];
        if (ctas == 0) return;
        optim8bit_kernel<K, T><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(table, qm, h);
        FUSEDOPS_CHECK_LAUNCH();
      };
      for (const StepTensor& st : ts) {
        const int64_t ctas = (blocks_of(st.n) + kWarps - 1) / kWarps;
        // A full table, or a grid that would pass 2^31 CTAs, goes out as its own launch.
        if (table.count == kMaxTensors || table.first[table.count] + ctas >= (int64_t{1} << 31)) {
          launch();
          table.count = 0;
        }
        table.t[table.count] = st;
        table.first[table.count + 1] = table.first[table.count] + ctas;
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

}  // namespace
}  // namespace optim8bit
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("optim8bit_step_", TORCH_BOX(&fusedops::optim8bit::optim8bit_step_));
}
