// LayerNorm / RMSNorm + activation (+ residual add) on CUDA tensors, forward and backward.
//
// One block per row (grid-stride over rows). Each thread owns the same columns of every
// row: packets of V elements (16-byte accesses when the rows are aligned and N % V == 0,
// else V = 1), P packets per thread held in registers (fp32). Statistics by warp shuffles
// + a shared-memory combine, fp32, two-pass (mean, then sum of squared deviations).
// Rows too long for registers (more than 512 threads x 16 packets; backward 512 x 4) take a streaming path
// that re-reads the row from global memory (L2) per pass.
// Backward: a fixed grid of `P_rows` blocks (the caller's partial count), each owning a
// contiguous range of rows; dW/dB accumulate per thread in fp32 registers over the range
// (a thread owns its columns), then one fp32 partial row per block; the caller sums them
// in order (deterministic, no atomics).
#include "cuda_utils.cuh"

#include <algorithm>
#include <initializer_list>
#include <utility>

namespace fusedops {
namespace {

constexpr int kMaxThreads = 512;  // every kernel: __launch_bounds__(512), up to 128 registers a thread
constexpr int kMaxPacks = 16;

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case 1: return z > 0.f ? z : 0.f;
    case 2: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case 3: return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case 4: return z / (1.f + expf(-z));
    default: return z;
  }
}

__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case 1: return z > 0.f ? 1.f : 0.f;
    case 2: return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * expf(-0.5f * z * z) * 0.39894228040143268f;
    case 3: {
      const float t = tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.79788456080286536f * (1.f + 0.134145f * z * z);
    }
    case 4: {
      const float sg = 1.f / (1.f + expf(-z));
      return sg * (1.f + z * (1.f - sg));
    }
    default: return 1.f;
  }
}

// Sum over the block; every thread gets the result. `red` holds 33 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  return red[32];
}

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
  const Packed<T, V> v = *reinterpret_cast<const Packed<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(v.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const float* in) {
  Packed<T, V> v;
#pragma unroll
  for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Packed<T, V>*>(p) = v;
}

struct FwdParams {
  const void* x; const void* r; void* s; void* y; const void* w; const void* b; float* mean; float* rstd;
  int64_t m, n, sx, sr, ss, sy;
  float eps;
  int act;
  bool rms, has_r, has_w, has_b;
};

// s (fp32) of one packet: x, or x + r rounded to T.
template <typename T, int V>
__device__ __forceinline__ void load_s(const FwdParams& p, int64_t row, int64_t col, float* v) {
  load_pack<T, V>(static_cast<const T*>(p.x) + row * p.sx + col, v);
  if (p.has_r) {
    float r[V];
    load_pack<T, V>(static_cast<const T*>(p.r) + row * p.sr + col, r);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = static_cast<float>(static_cast<T>(v[k] + r[k]));
  }
}

template <typename T, typename W, typename Y, int V>
__device__ __forceinline__ void store_y(const FwdParams& p, int64_t row, int64_t col, const float* v, float mean,
                                        float rstd) {
  float w[V], b[V], out[V];
  if (p.has_w) load_pack<W, V>(static_cast<const W*>(p.w) + col, w);
  if (p.has_b) load_pack<W, V>(static_cast<const W*>(p.b) + col, b);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float z = (v[k] - mean) * rstd;
    if (p.has_w) z *= w[k];
    if (p.has_b) z += b[k];
    out[k] = act_fwd(z, p.act);
  }
  store_pack<Y, V>(static_cast<Y*>(p.y) + row * p.sy + col, out);
}

// Row in registers: P packets of V elements per thread.
template <typename T, typename W, typename Y, int V, int P>
__global__ void __launch_bounds__(kMaxThreads) norm_act_fwd_kernel(const FwdParams p) {
  __shared__ float red[33];
  const int64_t n = p.n;
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    float v[P][V];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) {
        load_s<T, V>(p, row, col, v[k]);
        if (p.has_r) store_pack<T, V>(static_cast<T*>(p.s) + row * p.ss + col, v[k]);
#pragma unroll
        for (int e = 0; e < V; ++e) sum += v[k][e];
      }
    }
    float mean = 0.f;
    if (!p.rms) mean = block_sum(sum, red) / static_cast<float>(n);
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = v[k][e] - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(block_sum(sq, red) / static_cast<float>(n) + p.eps);
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) store_y<T, W, Y, V>(p, row, col, v[k], mean, rstd);
    }
  }
}

// Long rows: three passes over the row (mean, variance, output), s recomputed per pass.
template <typename T, typename W, typename Y, int V>
__global__ void __launch_bounds__(kMaxThreads) norm_act_fwd_stream_kernel(const FwdParams p) {
  __shared__ float red[33];
  const int64_t n = p.n;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    float v[V];
    float mean = 0.f;
    if (!p.rms) {
      float sum = 0.f;
      for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
        load_s<T, V>(p, row, col, v);
#pragma unroll
        for (int e = 0; e < V; ++e) sum += v[e];
      }
      mean = block_sum(sum, red) / static_cast<float>(n);
    }
    float sq = 0.f;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
      load_s<T, V>(p, row, col, v);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = v[e] - mean;
        sq += d * d;
      }
    }
    const float rstd = rsqrtf(block_sum(sq, red) / static_cast<float>(n) + p.eps);
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
      load_s<T, V>(p, row, col, v);
      if (p.has_r) store_pack<T, V>(static_cast<T*>(p.s) + row * p.ss + col, v);
      store_y<T, W, Y, V>(p, row, col, v, mean, rstd);
    }
  }
}

struct BwdParams {
  const void* dy; const void* xs; const void* w; const void* b; const float* mean; const float* rstd;
  const void* ds; void* dx; float* dwp; float* dbp;
  int64_t m, n, sdy0, sdy1, sxs, sds0, sds1, sdx, rows_per_block;
  int act;
  bool rms, has_w, has_b, has_ds;
};

// dz and xhat of one packet (dy and ds read element by element through their strides
// unless dense; xs through packets).
template <typename T, typename W, typename Y, int V, bool kDenseDy>
__device__ __forceinline__ void dz_xhat(const BwdParams& p, int64_t row, int64_t col, float mean, float rstd,
                                        float* dz, float* xh, float* w) {
  load_pack<T, V>(static_cast<const T*>(p.xs) + row * p.sxs + col, xh);
  float b[V];
  if (p.has_w) load_pack<W, V>(static_cast<const W*>(p.w) + col, w);
  if (p.has_b) load_pack<W, V>(static_cast<const W*>(p.b) + col, b);
  float dy[V];
  if constexpr (kDenseDy) {
    load_pack<Y, V>(static_cast<const Y*>(p.dy) + row * p.sdy0 + col, dy);
  } else {
    const Y* d = static_cast<const Y*>(p.dy) + row * p.sdy0;
#pragma unroll
    for (int e = 0; e < V; ++e) dy[e] = static_cast<float>(d[(col + e) * p.sdy1]);
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    xh[e] = (xh[e] - mean) * rstd;
    float z = xh[e];
    if (p.has_w) z *= w[e];
    if (p.has_b) z += b[e];
    dz[e] = dy[e] * act_grad(z, p.act);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_dx(const BwdParams& p, int64_t row, int64_t col, float* dx) {
  if (p.has_ds) {
    const T* d = static_cast<const T*>(p.ds) + row * p.sds0;
#pragma unroll
    for (int e = 0; e < V; ++e) dx[e] += static_cast<float>(d[(col + e) * p.sds1]);
  }
  store_pack<T, V>(static_cast<T*>(p.dx) + row * p.sdx + col, dx);
}

template <typename T, typename W, typename Y, int V, int P, bool kDenseDy>
__global__ void __launch_bounds__(kMaxThreads) norm_act_bwd_kernel(const BwdParams p) {
  __shared__ float red[33];
  const int64_t n = p.n;
  float dw[P][V], db[P][V];
#pragma unroll
  for (int k = 0; k < P; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) dw[k][e] = db[k][e] = 0.f;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t end = min(p.m, begin + p.rows_per_block);
  for (int64_t row = begin; row < end; ++row) {
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float g[P][V], xh[P][V];
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) {
        float w[V];
        dz_xhat<T, W, Y, V, kDenseDy>(p, row, col, mean, rstd, g[k], xh[k], w);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dw[k][e] += g[k][e] * xh[k][e];
          db[k][e] += g[k][e];
          if (p.has_w) g[k][e] *= w[e];
          c1 += g[k][e];
          c2 += g[k][e] * xh[k][e];
        }
      }
    }
    const float m2 = block_sum(c2, red) / static_cast<float>(n);
    const float m1 = p.rms ? 0.f : block_sum(c1, red) / static_cast<float>(n);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) {
        float dx[V];
#pragma unroll
        for (int e = 0; e < V; ++e) dx[e] = (g[k][e] - m1 - xh[k][e] * m2) * rstd;
        store_dx<T, V>(p, row, col, dx);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
    if (col < n) {
      if (p.has_w) store_pack<float, V>(p.dwp + blockIdx.x * n + col, dw[k]);
      if (p.has_b) store_pack<float, V>(p.dbp + blockIdx.x * n + col, db[k]);
    }
  }
}

// Long rows: two passes per row (row sums, then dx); the block's dW/dB partial row lives
// in global memory, each column read-modified-written only by the thread that owns it.
template <typename T, typename W, typename Y, int V, bool kDenseDy>
__global__ void __launch_bounds__(kMaxThreads) norm_act_bwd_stream_kernel(const BwdParams p) {
  __shared__ float red[33];
  const int64_t n = p.n;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  float* dwp = p.has_w ? p.dwp + blockIdx.x * n : nullptr;
  float* dbp = p.has_b ? p.dbp + blockIdx.x * n : nullptr;
  for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (dwp) dwp[col + e] = 0.f;
      if (dbp) dbp[col + e] = 0.f;
    }
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t end = min(p.m, begin + p.rows_per_block);
  for (int64_t row = begin; row < end; ++row) {
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float c1 = 0.f, c2 = 0.f;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
      float g[V], xh[V], w[V];
      dz_xhat<T, W, Y, V, kDenseDy>(p, row, col, mean, rstd, g, xh, w);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (dwp) dwp[col + e] += g[e] * xh[e];
        if (dbp) dbp[col + e] += g[e];
        if (p.has_w) g[e] *= w[e];
        c1 += g[e];
        c2 += g[e] * xh[e];
      }
    }
    const float m2 = block_sum(c2, red) / static_cast<float>(n);
    const float m1 = p.rms ? 0.f : block_sum(c1, red) / static_cast<float>(n);
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < n; col += step) {
      float g[V], xh[V], w[V], dx[V];
      dz_xhat<T, W, Y, V, kDenseDy>(p, row, col, mean, rstd, g, xh, w);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (p.has_w) g[e] *= w[e];
        dx[e] = (g[e] - m1 - xh[e] * m2) * rstd;
      }
      store_dx<T, V>(p, row, col, dx);
    }
  }
}

// Launch shape for rows of n elements in packets of V: threads (a multiple of 32, at most
// kMaxThreads) and packets per thread P (powers of two up to max_packs); P = 0 means the
// streaming path (the row does not fit the registers).
struct Shape {
  int threads, packs;
};

Shape pick_shape(int64_t n, int v, int max_packs) {
  const int64_t np = (n + v - 1) / v;
  for (int pk = 1; pk <= max_packs; pk *= 2) {
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
// Y: y / dy dtype, T or float (autocast's fp32 output).
template <typename Fn>
void dispatch_norm(ScalarType xt, ScalarType wt, bool y_float, Fn&& fn) {
  dispatch_float(xt, "x", [&]<typename T>() {
    auto with_w = [&]<typename W>() {
      if (y_float) fn.template operator()<T, W, float>();
      else fn.template operator()<T, W, T>();
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

template <typename T, typename W, typename Y, int V>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const Shape sh = pick_shape(p.n, V, kMaxPacks);
  const dim3 grid(grid_rows(p.m));
  switch (sh.packs) {
    case 1: norm_act_fwd_kernel<T, W, Y, V, 1><<<grid, sh.threads, 0, stream>>>(p); break;
    case 2: norm_act_fwd_kernel<T, W, Y, V, 2><<<grid, sh.threads, 0, stream>>>(p); break;
    case 4: norm_act_fwd_kernel<T, W, Y, V, 4><<<grid, sh.threads, 0, stream>>>(p); break;
    case 8: norm_act_fwd_kernel<T, W, Y, V, 8><<<grid, sh.threads, 0, stream>>>(p); break;
    case 16: norm_act_fwd_kernel<T, W, Y, V, 16><<<grid, sh.threads, 0, stream>>>(p); break;
    default: norm_act_fwd_stream_kernel<T, W, Y, V><<<grid, kMaxThreads, 0, stream>>>(p); break;
  }
  FUSEDOPS_CHECK_LAUNCH();
}

void norm_act_fwd(Tensor x, Tensor r, Tensor s, Tensor y, Tensor w, Tensor b, Tensor mean, Tensor rstd, double eps,
                  int64_t act, bool rms, bool has_r, bool has_w, bool has_b) {
  STD_TORCH_CHECK(x.is_cuda() && y.is_cuda() && rstd.is_cuda(),
                  "fusedops_C::norm_act_fwd (CUDA): tensors must be CUDA tensors");
  STD_TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
                  "fusedops_C::norm_act_fwd (CUDA): x and y must be 2-D with unit column stride");
  STD_TORCH_CHECK(!has_r || (r.stride(1) == 1 && s.stride(1) == 1),
                  "fusedops_C::norm_act_fwd (CUDA): r and s must have unit column stride");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_fwd (CUDA): weight and bias must share a dtype");
  STD_TORCH_CHECK(y.scalar_type() == x.scalar_type() || y.scalar_type() == ScalarType::Float,
                  "fusedops_C::norm_act_fwd (CUDA): y must be x's dtype or float32");
  FwdParams p{x.data_ptr(), has_r ? r.data_ptr() : nullptr, has_r ? s.data_ptr() : nullptr, y.data_ptr(),
              has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
              rms ? nullptr : static_cast<float*>(mean.data_ptr()), static_cast<float*>(rstd.data_ptr()),
              x.size(0), x.size(1), x.stride(0), has_r ? r.stride(0) : 0, has_r ? s.stride(0) : 0, y.stride(0),
              static_cast<float>(eps), static_cast<int>(act), rms, has_r, has_w, has_b};
  if (p.m == 0 || p.n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  cudaStream_t stream = current_stream(x.get_device_index());
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : x.scalar_type());
  const bool y_float = y.scalar_type() != x.scalar_type();
  dispatch_norm(x.scalar_type(), wt, y_float, [&]<typename T, typename W, typename Y>() {
    constexpr int V = 16 / sizeof(T);
    // Packets of V elements need every row start aligned to V elements in every tensor
    // (weight packets too: V of W may be wider than 16 bytes, which Packed allows).
    const bool packed = can_pack<V>(p.n, {{p.x, p.sx}, {p.r, p.sr}, {p.s, p.ss}}, sizeof(T)) &&
                        can_pack<V>(p.n, {{p.y, p.sy}}, sizeof(Y)) && can_pack<V>(p.n, {{p.w, 0}, {p.b, 0}}, sizeof(W));
    if (packed) {
      launch_fwd<T, W, Y, V>(p, stream);
    } else {  // odd N or unaligned rows: element accesses, streaming path
      norm_act_fwd_stream_kernel<T, W, Y, 1><<<dim3(grid_rows(p.m)), kMaxThreads, 0, stream>>>(p);
      FUSEDOPS_CHECK_LAUNCH();
    }
  });
}

template <typename T, typename W, typename Y, int V>
void launch_bwd(const BwdParams& p, int blocks, cudaStream_t stream) {
  const Shape sh = pick_shape(p.n, V, 4);  // g, xhat, dW, dB: 4 * P * V floats a thread
  switch (sh.packs) {
    case 1: norm_act_bwd_kernel<T, W, Y, V, 1, true><<<blocks, sh.threads, 0, stream>>>(p); break;
    case 2: norm_act_bwd_kernel<T, W, Y, V, 2, true><<<blocks, sh.threads, 0, stream>>>(p); break;
    case 4: norm_act_bwd_kernel<T, W, Y, V, 4, true><<<blocks, sh.threads, 0, stream>>>(p); break;
    default: norm_act_bwd_stream_kernel<T, W, Y, V, true><<<blocks, kMaxThreads, 0, stream>>>(p); break;
  }
  FUSEDOPS_CHECK_LAUNCH();
}

void norm_act_bwd(Tensor dy, Tensor xs, Tensor w, Tensor b, Tensor mean, Tensor rstd, Tensor ds, Tensor dx,
                  Tensor dwp, Tensor dbp, int64_t act, bool rms, bool has_w, bool has_b, bool has_ds) {
  STD_TORCH_CHECK(xs.is_cuda() && dy.is_cuda() && dx.is_cuda(),
                  "fusedops_C::norm_act_bwd (CUDA): tensors must be CUDA tensors");
  STD_TORCH_CHECK(xs.dim() == 2 && dx.dim() == 2 && dy.dim() == 2 && xs.stride(1) == 1 && dx.stride(1) == 1,
                  "fusedops_C::norm_act_bwd (CUDA): xs, dx must be 2-D with unit column stride, dy 2-D");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_bwd (CUDA): weight and bias must share a dtype");
  STD_TORCH_CHECK(dy.scalar_type() == xs.scalar_type() || dy.scalar_type() == ScalarType::Float,
                  "fusedops_C::norm_act_bwd (CUDA): dy must be s's dtype or float32");
  STD_TORCH_CHECK(!has_ds || ds.scalar_type() == xs.scalar_type(),
                  "fusedops_C::norm_act_bwd (CUDA): ds must have s's dtype");
  const int64_t m = xs.size(0), n = xs.size(1);
  if (m == 0 || n == 0) return;
  const int64_t blocks = has_w ? dwp.size(0) : (has_b ? dbp.size(0) : std::min<int64_t>(m, 1024));
  STD_TORCH_CHECK(blocks >= 1 && blocks < (int64_t{1} << 31), "fusedops_C::norm_act_bwd (CUDA): bad partial count");
  BwdParams p{dy.data_ptr(), xs.data_ptr(), has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
              rms ? nullptr : static_cast<const float*>(mean.data_ptr()),
              static_cast<const float*>(rstd.data_ptr()), has_ds ? ds.data_ptr() : nullptr, dx.data_ptr(),
              has_w ? static_cast<float*>(dwp.data_ptr()) : nullptr,
              has_b ? static_cast<float*>(dbp.data_ptr()) : nullptr, m, n, dy.stride(0), dy.stride(1),
              xs.stride(0), has_ds ? ds.stride(0) : 0, has_ds ? ds.stride(1) : 0, dx.stride(0),
              (m + blocks - 1) / blocks, static_cast<int>(act), rms, has_w, has_b, has_ds};
  torch::stable::accelerator::DeviceGuard guard(xs.get_device_index());
  cudaStream_t stream = current_stream(xs.get_device_index());
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : xs.scalar_type());
  const bool dy_float = dy.scalar_type() != xs.scalar_type();
  dispatch_norm(xs.scalar_type(), wt, dy_float, [&]<typename T, typename W, typename Y>() {
    constexpr int V = 16 / sizeof(T);
    const bool packed = can_pack<V>(n, {{p.xs, p.sxs}, {p.dx, p.sdx}}, sizeof(T)) &&
                        can_pack<V>(n, {{p.w, 0}, {p.b, 0}}, sizeof(W)) &&
                        can_pack<V>(n, {{p.dwp, 0}, {p.dbp, 0}}, sizeof(float)) && p.sdy1 == 1 &&
                        can_pack<V>(n, {{p.dy, p.sdy0}}, sizeof(Y));
    if (packed) {
      launch_bwd<T, W, Y, V>(p, static_cast<int>(blocks), stream);
    } else {  // strided dy (e.g. stride 0 from .sum()), odd N or unaligned rows
      norm_act_bwd_stream_kernel<T, W, Y, 1, false><<<static_cast<int>(blocks), kMaxThreads, 0, stream>>>(p);
      FUSEDOPS_CHECK_LAUNCH();
    }
  });
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("norm_act_fwd", TORCH_BOX(&fusedops::norm_act_fwd));
  m.impl("norm_act_bwd", TORCH_BOX(&fusedops::norm_act_bwd));
}
