// 8-bit optimizer step on CUDA tensors: every tensor of the step in one launch.
//
// Persistent CTAs: the grid is at most (resident CTAs per SM) x (SMs); a warp handles one
// quantization block of 256 elements at a time (8 contiguous elements per lane, 16- and
// 8-byte accesses when aligned) and walks the blocks of all tensors in grid-stride order.
// Each CTA copies the code maps and the quantizer's bucket tables into shared memory once.
// Per block: dequantize both states (code[c] * absmax), fp32 update (csrc/optim8bit.h:
// the same operation order as the C++ CPU kernel and the reference, every op separately
// rounded), block absmax by warp shuffles, requantize with one bucket-table lookup per
// element (csrc/optim8bit.h quantize).
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
// it gives +0 for -0 / b (IEEE: -0), which quantizes to the same code.
struct BlockDiv {
  float b, y, lo, hi;

  __device__ __forceinline__ explicit BlockDiv(float b_) : b(b_) {
    float y0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(b));
    y = __fmaf_rn(y0, __fmaf_rn(-b, y0, 1.f), y0);
    const bool ok = b >= 0x1p-60f && b <= 0x1p60f;
    lo = ok ? fmaxf(__fmul_rn(b, 0x1p-50f), 0x1p-90f) : INFINITY;  // !ok: every x goes the slow way
    hi = __fmul_rn(b, 0x1p50f);
  }
  __device__ __forceinline__ bool fast(float x) const {
    const float a = fabsf(x);
    return (a >= lo && a <= hi) || x == 0.f;
  }
  __device__ __forceinline__ float quotient(float x) const {
    const float q0 = __fmul_rn(x, y);
    return __fmaf_rn(y, __fmaf_rn(-q0, b, x), q0);
  }
};

// Normalises a lane's 8 elements by the block absmax (normalise() of csrc/optim8bit.h).
__device__ __forceinline__ void normalise8(const float (&x)[kPer], float mx, float (&q)[kPer]) {
  if (mx == 0.f) {  // warp-uniform: an all-zero block
#pragma unroll
    for (int i = 0; i < kPer; ++i) q[i] = 0.f;
    return;
  }
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

__device__ __forceinline__ void store_state(bool f32, void* s, float* a, int64_t b, int64_t e0, int len, bool vec,
                                            const uint32_t* buckets, int lane, const float (&x)[kPer]) {
  if (f32) {
    store8(static_cast<float*>(s) + e0, x, len, vec && aligned_to(static_cast<float*>(s) + e0, 16));
    return;
  }
  float mx = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) mx = fmaxf(mx, fabsf(x[i]));  // padding lanes hold 0
  mx = warp_max(mx);
  float q[kPer];
  normalise8(x, mx, q);
  int c[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) c[i] = quantize(q[i], buckets);
  store_codes(static_cast<uint8_t*>(s) + e0, c, len, vec && aligned_to(static_cast<uint8_t*>(s) + e0, 8));
  if (lane == 0) a[b] = mx;
}

// Shared memory: the code maps (signed, then unsigned for two-state kinds) and the bucket
// tables (signed, then unsigned), copied from qmaps once per CTA.
template <bool kTwo>
constexpr int smem_floats() {
  return kTwo ? 512 + 4 * kBuckets : 256 + 2 * kBuckets;
}

// One quantization block `b` of tensor `t` by one warp.
template <int64_t K, typename T>
__device__ __forceinline__ void step_block(const StepTensor& t, int64_t b, int lane, const float* sm, const Hyper& h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  const float* code1 = sm;
  const float* code2 = sm + 256;
  const uint32_t* tab1 = reinterpret_cast<const uint32_t*>(sm + (kTwo ? 512 : 256));
  const uint32_t* tab2 = tab1 + 2 * kBuckets;
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
  load_state(t, f1, t.s1, t.a1, b, e0, len, full, code1, kSignedZero, m);
  if constexpr (kTwo) load_state(t, f2, t.s2, t.a2, b, e0, len, full, code2, 0, v);
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
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (h.sr) {  // stochastic rounding: p becomes a bf16 value (the store's conversion is exact)
      const uint32_t key = sr_tensor_key(h.sr_key, t.index);
#pragma unroll
      for (int i = 0; i < kPer; ++i) p[i] = round_bf16_stochastic(p[i], sr_bits(key, e0 + i));
    }
  }
  store8(pp, p, len, full && aligned_to(pp, 16));
  store_state(f1, t.s1, t.a1, b, e0, len, full, tab1, lane, m);
  if constexpr (kTwo) store_state(f2, t.s2, t.a2, b, e0, len, full, tab2, lane, v);
}

// Resident CTAs per SM the kernel is built for (registers: 65536 / (256 * this)).
template <int64_t K>
constexpr int min_ctas() {
  return (K == kAdamW || K == kAdam) ? 4 : 5;
}

template <int64_t K, typename T>
__global__ void __launch_bounds__(kThreads, min_ctas<K>())
optim8bit_kernel(const __grid_constant__ StepTable table, const float* __restrict__ qmaps, const Hyper h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  extern __shared__ float4 sm4[];
  float* sm = reinterpret_cast<float*>(sm4);
  {
    // codes: qmaps[0, 256) (+ [512, 768)); tables: qmaps[1024, 1024 + 2 or 4 kBuckets)
    const float4* q4 = reinterpret_cast<const float4*>(qmaps);
    constexpr int kCode4 = (kTwo ? 512 : 256) / 4, kTab4 = (smem_floats<kTwo>() - (kTwo ? 512 : 256)) / 4;
    for (int i = threadIdx.x; i < kCode4; i += kThreads) sm4[i] = q4[i < 64 ? i : i + 64];
    for (int i = threadIdx.x; i < kTab4; i += kThreads) sm4[kCode4 + i] = q4[kSignedTable / 4 + i];
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
  const size_t smem = sizeof(float) * smem_floats<K == kAdamW || K == kAdam>();
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
        optim8bit_kernel<K, T><<<static_cast<unsigned>(ctas), kThreads,
                                 sizeof(float) * smem_floats<K == kAdamW || K == kAdam>(), stream>>>(table, qm, h);
        FUSEDOPS_CHECK_LAUNCH();
      };
      for (const StepTensor& st : ts) {
        if (table.count == kMaxTensors) {  // a full table goes out as its own launch
          launch();
          table.count = 0;
        }
        table.t[table.count] = st;
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
