// Shared device helpers of the LayerNorm / RMSNorm + activation CUDA kernels
// (csrc/cuda/norm.cu: forward, csrc/cuda/norm_bwd.cu: backward).
#pragma once
#include "cuda_utils.cuh"
#include "../norm_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

namespace fusedops {
namespace {

constexpr int kMaxThreads = 512;  // forward and streaming kernels: __launch_bounds__(512)
constexpr int kMaxPacks = 16;

// Programmatic dependent launch (sm_90+): a norm kernel launched with it may be made resident
// while the kernel before it in the stream finishes, instead of after; grid_dep_wait(), the
// first statement of every norm kernel (before any global memory access, reads and writes
// alike), waits for that kernel's completion and its memory. Without the launch attribute
// (or before sm_90) it returns at once. The kernels never signal their dependents early
// (griddepcontrol.launch_dependents): a waiting grid would hold SM slots that their own
// blocks still need.
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the norm kernels launch with programmatic dependent launch on `device` (sm_90+;
// FUSEDOPS_NORM_CUDA_PDL=0 turns it off, read once).
inline bool norm_pdl(int32_t device) {
  static const bool on = [] {
    const char* v = std::getenv("FUSEDOPS_NORM_CUDA_PDL");
    return v == nullptr || std::string(v) != "0";
  }();
  return on && has_clusters(device);
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx: with
// programmatic dependent launch when `pdl`, as a cluster of `cluster` blocks when > 1.
template <typename... KArgs, typename... Args>
void launch_norm(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                 unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2]{};
  unsigned count = 0;
  if (pdl) {
    attrs[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  if (cluster > 1) {
    attrs[count].id = cudaLaunchAttributeClusterDimension;
    attrs[count].val.clusterDim.x = cluster;
    attrs[count].val.clusterDim.y = 1;
    attrs[count].val.clusterDim.z = 1;
    ++count;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = count;
  FUSEDOPS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// 1 / x through the hardware reciprocal (relative error < 2^-22; 1 / inf = 0).
__device__ __forceinline__ float fast_rcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// 2^x through the hardware (ex2.approx.ftz: relative error < 2^-22; results below 2^-126
// flush to 0, 2^inf = inf, 2^-inf = 0). __expf adds a range fix for subnormal results (3
// instructions) that the activations below do not need: their e only enters 1 + e.
__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Activations in fp32, the activation a compile-time constant of every kernel (no branch
// per element). gelu_tanh as z * sigmoid(2u) (0.5 (1 + tanh u) = sigmoid(2u), 2u = c (z +
// a z^3), c = 2 sqrt(2 / pi), a = 0.044715) and silu as z * sigmoid(z), with e = exp(-2u)
// or exp(-z) as one 2^x of constants folded in double precision, and the hardware
// reciprocal: a few instructions instead of tanhf / expf / IEEE division, which made the
// kernels compute-bound (the Triton kernels use the same forms); erf stays erff.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kGeluC = 1.5957691216057308;  // 2 sqrt(2 / pi)
constexpr double kGeluA = 0.044715;
constexpr float kGeluE1 = static_cast<float>(-kGeluC * kLog2e);           // exp(-2u) = 2^(z (E1 + E3 z^2))
constexpr float kGeluE3 = static_cast<float>(-kGeluC * kGeluA * kLog2e);
constexpr float kGeluD1 = static_cast<float>(kGeluC);                     // d(2u)/dz = D1 + D3 z^2
constexpr float kGeluD3 = static_cast<float>(3.0 * kGeluC * kGeluA);

template <int kAct>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (kAct == 1) {
    return z > 0.f ? z : 0.f;
  } else if constexpr (kAct == 2) {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
  } else if constexpr (kAct == 3) {
    return z * fast_rcp(1.f + fast_exp2(z * fmaf(kGeluE3, z * z, kGeluE1)));
  } else if constexpr (kAct == 4) {
    return z * fast_rcp(1.f + fast_exp2(z * static_cast<float>(-kLog2e)));
  } else {
    return z;
  }
}

template <int kAct>
__device__ __forceinline__ float act_grad(float z) {
  if constexpr (kAct == 1) {
    return z > 0.f ? 1.f : 0.f;
  } else if constexpr (kAct == 2) {
    return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
           z * fast_exp2(z * z * static_cast<float>(-0.5 * kLog2e)) * 0.39894228040143268f;
  } else if constexpr (kAct == 3) {
    // d/dz z sg = sg + z sg (1 - sg) d(2u)/dz, sg = sigmoid(2u) = 1 / (1 + e); 1 - sg as
    // e sg (no cancellation where sg ~ 1), e clamped so that e = inf (sg = 0) gives 0
    const float z2 = z * z;
    const float e = fast_exp2(z * fmaf(kGeluE3, z2, kGeluE1));
    const float sg = fast_rcp(1.f + e);
    const float one_minus = fminf(e, 1e30f) * sg;
    return fmaf(z * sg * one_minus, fmaf(kGeluD3, z2, kGeluD1), sg);
  } else if constexpr (kAct == 4) {
    const float sg = fast_rcp(1.f + fast_exp2(z * static_cast<float>(-kLog2e)));
    return sg * fmaf(z, 1.f - sg, 1.f);
  } else {
    return 1.f;
  }
}

// The same with the activation known only at run time (the streaming kernels).
__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case 1: return act_fwd<1>(z);
    case 2: return act_fwd<2>(z);
    case 3: return act_fwd<3>(z);
    case 4: return act_fwd<4>(z);
    default: return z;
  }
}

__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case 1: return act_grad<1>(z);
    case 2: return act_grad<2>(z);
    case 3: return act_grad<3>(z);
    case 4: return act_grad<4>(z);
    default: return 1.f;
  }
}

// Sum over the warp by a butterfly: every lane gets the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `red` holds 33 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const float t = warp_sum(lane < warps ? red[lane] : 0.f);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  return red[32];
}

// Sum over the block with one barrier; every thread gets the same bits (a butterfly:
// each step adds two equal-order partial sums, commutative). `red` holds 32 floats and must
// not be written again before every thread has passed another barrier: callers alternate
// two buffers.
__device__ __forceinline__ float block_sum1(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? red[lane] : 0.f);
}

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
  const Packed<T, V> v = *reinterpret_cast<const Packed<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(v.v[k]);
}

// Two floats rounded to T (16-bit) as the 32 bits of the pair, the first in the low half: one
// conversion instruction on sm_80+ (cvt.rn.bf16x2 / f16x2; F2FP...PACK_AB in SASS, as for
// static_cast<T>: the same bits).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t u;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    memcpy(&u, &h, 4);
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "pack2: 16-bit T");
    const __half2 h = __floats2half2_rn(a, b);
    memcpy(&u, &h, 4);
  }
  return u;
}

// 16 bytes to global memory in one st.global.v4 (p 16-byte aligned); the memory clobber keeps
// the compiler's ordering of the store against other memory accesses.
__device__ __forceinline__ void store16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// A packet of V elements from fp32. kVec: through store16 (inline PTX), for the cluster
// backward (8192 < n <= 16384), whose plain dx stores the compiler split into 16-bit stores
// (st.global.u16 / .v2.u16 in the PTX where a 16-byte packet was written: several store
// instructions and partial-sector writes a packet). H100, LN+GELU(tanh) bf16 32768 x 16384:
// backward 1490 µs against 1602-1630 (128 registers, as before). The forward's block kernel
// has the same split stores from 4 packets a thread (the packets after the first two), and
// so has the pre-sm_90 16384 backward (kSmemAcc); neither uses kVec yet: in the forward the
// inline store, built together with launch bounds of two blocks an SM, measured slower
// (bench/NOTES.md, round 16), and the pre-sm_90 kernel has not been measured.
template <typename T, int V, bool kVec = false>
__device__ __forceinline__ void store_pack(T* p, const float* in) {
  if constexpr (kVec && std::is_same_v<T, float> && V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V / 4; ++i)
      store16(p + 4 * i, __float_as_uint(in[4 * i]), __float_as_uint(in[4 * i + 1]), __float_as_uint(in[4 * i + 2]),
              __float_as_uint(in[4 * i + 3]));
  } else if constexpr (kVec && sizeof(T) == 2 && V % 8 == 0) {
#pragma unroll
    for (int i = 0; i < V / 8; ++i) {
      const float* f = in + 8 * i;
      store16(p + 8 * i, pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
    }
  } else {
    Packed<T, V> v;
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Packed<T, V>*>(p) = v;
  }
}

// Launch shape for rows of n elements in packets of V: threads (a multiple of 32, at most
// kMaxThreads) and packets per thread P (powers of two from min_packs up to max_packs);
// P = 0 means the streaming path (the row does not fit the registers).
struct Shape {
  int threads, packs;
};

Shape pick_shape(int64_t n, int v, int min_packs, int max_packs) {
  const int64_t np = (n + v - 1) / v;
  for (int pk = min_packs; pk <= max_packs; pk *= 2) {
    const int64_t t = ((np + pk - 1) / pk + 31) / 32 * 32;
    if (t <= 256 || (pk >= 2 && t <= kMaxThreads)) return {static_cast<int>(t), pk};
  }
  return {kMaxThreads, 0};
}

template <int V>
bool can_pack(int64_t n, std::initializer_list<std::pair<const void*, int64_t>> ptr_and_bytes_stride,
              size_t elem) {
  if (n % V != 0) return false;
  for (const auto& [ptr, stride] : ptr_and_bytes_stride) {
    if (ptr == nullptr) continue;
    if (!aligned_to(ptr, elem * V) || (stride * static_cast<int64_t>(elem)) % static_cast<int64_t>(elem * V) != 0)
      return false;
  }
  return true;
}

// T: x dtype; W: weight/bias dtype, T or float (the caller casts others to float);
// Y: y / dy dtype (norm::dispatch_out: T, float, or 16-bit for an fp32 T).
template <typename Fn>
void dispatch_norm(ScalarType xt, ScalarType wt, ScalarType yt, Fn&& fn) {
  dispatch_float(xt, "x", [&]<typename T>() {
    auto with_w = [&]<typename W>() {
      norm::dispatch_out<T>(yt, [&]<typename Y>() { fn.template operator()<T, W, Y>(); });
    };
    if (wt == xt) {
      with_w.template operator()<T>();
    } else {
      STD_TORCH_CHECK(wt == ScalarType::Float, "fusedops_C norm (CUDA): weight must have x's dtype or float32");
      with_w.template operator()<float>();
    }
  });
}

int grid_rows(int64_t m) { return static_cast<int>(std::min<int64_t>(m, 1 << 20)); }

}  // namespace
}  // namespace fusedops
