// LayerNorm / RMSNorm + activation (+ residual add) on CUDA tensors: the forward
// (the backward: norm_bwd.cu).
//
// One block per row (grid-stride over rows), or for rows of up to 32 x 4 packets one warp a
// row, kWarpRows rows a block (norm_act_fwd_warp_kernel). Each thread owns the same columns of every
// row: packets of V elements (16-byte accesses when the rows are aligned and N % V == 0,
// else V = 1), P packets per thread held in registers (fp32). Statistics by warp shuffles
// + a shared-memory combine (one barrier a reduction), fp32, two-pass (mean, then sum of
// squared deviations).
// Rows too long for registers (more than 512 threads x 16 packets) take a streaming path
// that re-reads the row from global memory (L2) per pass.
#include "norm_common.cuh"
#include "../norm_ops.h"

#include <cstdlib>
#include <string>

namespace fusedops {
namespace {

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

// y of one packet; kAct < 0: the activation read from p.act (streaming kernel). A missing
// weight / bias is 1 / 0 (z = xhat * w + b without a branch per element).
template <typename T, typename W, typename Y, int V, int kAct>
__device__ __forceinline__ void store_y(const FwdParams& p, int64_t row, int64_t col, const float* v, float mean,
                                        float rstd) {
  float w[V], b[V], out[V];
#pragma unroll
  for (int k = 0; k < V; ++k) w[k] = 1.f, b[k] = 0.f;
  if (p.has_w) load_pack<W, V>(static_cast<const W*>(p.w) + col, w);
  if (p.has_b) load_pack<W, V>(static_cast<const W*>(p.b) + col, b);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float z = fmaf((v[k] - mean) * rstd, w[k], b[k]);
    if constexpr (kAct >= 0) {
      out[k] = act_fwd<kAct>(z);
    } else {
      out[k] = act_fwd(z, p.act);
    }
  }
  store_pack<Y, V>(static_cast<Y*>(p.y) + row * p.sy + col, out);
}

// Row in registers: P packets of V elements per thread; the activation a template argument.
template <typename T, typename W, typename Y, int V, int P, int kAct>
__global__ void __launch_bounds__(kMaxThreads) norm_act_fwd_kernel(const FwdParams p) {
  grid_dep_wait();
  __shared__ float red[2][32];  // alternated between reductions (block_sum1)
  int par = 0;
  const int64_t n = p.n;
  const float inv_n = 1.f / static_cast<float>(n);
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
    if (!p.rms) {
      mean = block_sum1(sum, red[par]) * inv_n;
      par ^= 1;
    }
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
    const float rstd = rsqrtf(block_sum1(sq, red[par]) * inv_n + p.eps);
    par ^= 1;
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col < n) store_y<T, W, Y, V, kAct>(p, row, col, v[k], mean, rstd);
    }
  }
}

// Long rows: three passes over the row (mean, variance, output), s recomputed per pass.
template <typename T, typename W, typename Y, int V>
__global__ void __launch_bounds__(kMaxThreads) norm_act_fwd_stream_kernel(const FwdParams p) {
  grid_dep_wait();
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
      store_y<T, W, Y, V, -1>(p, row, col, v, mean, rstd);
    }
  }
}

// Rows of up to 32 x 4 packets (bf16 / fp16 1024, fp32 512): one warp a row, kWarpRows rows a
// block; the statistics by shuffles alone (a butterfly: every lane gets the same bits), no
// shared memory and no barrier; 32 elements a thread at N = 1024 bf16 (twice the block
// kernel's 16: twice the bytes in flight a thread). H100, LN+GELU(tanh) bf16 32768 x 1024:
// 47.9 µs against 48.9 for the block kernel (2.8 TB/s, 93% of copy, before and after).
constexpr int kWarpRows = 4;

template <typename T, typename W, typename Y, int V, int P, int kAct>
__global__ void __launch_bounds__(32 * kWarpRows) norm_act_fwd_warp_kernel(const FwdParams p) {
  grid_dep_wait();
  const int64_t n = p.n;
  const float inv_n = 1.f / static_cast<float>(n);
  const int64_t lane = threadIdx.x;
  const int64_t rows_step = static_cast<int64_t>(gridDim.x) * kWarpRows;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.y; row < p.m; row += rows_step) {
    float v[P][V];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (lane + k * 32) * V;
      if (col < n) {
        load_s<T, V>(p, row, col, v[k]);
        if (p.has_r) store_pack<T, V>(static_cast<T*>(p.s) + row * p.ss + col, v[k]);
#pragma unroll
        for (int e = 0; e < V; ++e) sum += v[k][e];
      }
    }
    const float mean = p.rms ? 0.f : warp_sum(sum) * inv_n;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      if ((lane + k * 32) * V < n) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = v[k][e] - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_n + p.eps);
    if (lane == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t col = (lane + k * 32) * V;
      if (col < n) store_y<T, W, Y, V, kAct>(p, row, col, v[k], mean, rstd);
    }
  }
}

// FUSEDOPS_NORM_CUDA_FWD=block (read once; experiments) runs the rows that fit a warp in the
// block kernel instead.
bool fwd_warp_rows() {
  static const bool on = [] {
    const char* v = std::getenv("FUSEDOPS_NORM_CUDA_FWD");
    return !(v != nullptr && std::string(v) == "block");
  }();
  return on;
}

// At least 16 elements a thread (fewer threads a row: cheaper block reductions, more rows
// resident an SM; H100 bf16 32768 x 2048: 95 µs vs 122 with 8 a thread): P from 16 / V up,
// only those kernels compiled.
template <typename T, typename W, typename Y, int V>
void launch_fwd(const FwdParams& p, cudaStream_t stream, bool pdl) {
  constexpr int kMinPacks = V >= 16 ? 1 : 16 / V;
  if (p.n <= 32 * 4 * V && fwd_warp_rows()) {
    const dim3 grid(grid_rows((p.m + kWarpRows - 1) / kWarpRows)), block(32, kWarpRows);
    norm::dispatch_act(p.act, [&]<int kAct>() {
      const auto warp = [&]<int P>() {
        launch_norm(norm_act_fwd_warp_kernel<T, W, Y, V, P, kAct>, grid, block, 0, stream, pdl, 1, p);
      };
      if (p.n <= 32 * V) warp.template operator()<1>();
      else if (p.n <= 64 * V) warp.template operator()<2>();
      else warp.template operator()<4>();
    });
    return;
  }
  const Shape sh = pick_shape(p.n, V, kMinPacks, kMaxPacks);
  const dim3 grid(grid_rows(p.m));
  norm::dispatch_act(p.act, [&]<int kAct>() {
    const auto rows = [&]<int P>() {
      if constexpr (P >= kMinPacks) {
        launch_norm(norm_act_fwd_kernel<T, W, Y, V, P, kAct>, grid, dim3(sh.threads), 0, stream, pdl, 1, p);
      }
    };
    switch (sh.packs) {
      case 2: rows.template operator()<2>(); break;
      case 4: rows.template operator()<4>(); break;
      case 8: rows.template operator()<8>(); break;
      case 16: rows.template operator()<16>(); break;
      default:
        launch_norm(norm_act_fwd_stream_kernel<T, W, Y, V>, grid, dim3(kMaxThreads), 0, stream, pdl, 1, p);
        break;
    }
  });
}

void norm_act_fwd(Tensor x, Tensor r, Tensor s, Tensor y, Tensor w, Tensor b, Tensor mean, Tensor rstd, double eps,
                  int64_t act, bool rms, bool has_r, bool has_w, bool has_b) {
  STD_TORCH_CHECK(x.is_cuda() && y.is_cuda() && rstd.is_cuda(),
                  "fusedops_C::norm_act_fwd (CUDA): tensors must be CUDA tensors");
  STD_TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && norm::unit_columns(x) && norm::unit_columns(y),
                  "fusedops_C::norm_act_fwd (CUDA): x and y must be 2-D with unit column stride");
  STD_TORCH_CHECK(!has_r || (norm::unit_columns(r) && norm::unit_columns(s)),
                  "fusedops_C::norm_act_fwd (CUDA): r and s must have unit column stride");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_fwd (CUDA): weight and bias must share a dtype");
  FwdParams p{x.data_ptr(), has_r ? r.data_ptr() : nullptr, has_r ? s.data_ptr() : nullptr, y.data_ptr(),
              has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
              rms ? nullptr : static_cast<float*>(mean.data_ptr()), static_cast<float*>(rstd.data_ptr()),
              x.size(0), x.size(1), x.stride(0), has_r ? r.stride(0) : 0, has_r ? s.stride(0) : 0, y.stride(0),
              static_cast<float>(eps), static_cast<int>(act), rms, has_r, has_w, has_b};
  if (p.m == 0 || p.n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  cudaStream_t stream = current_stream(x.get_device_index());
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : x.scalar_type());
  dispatch_norm(x.scalar_type(), wt, y.scalar_type(), [&]<typename T, typename W, typename Y>() {
    constexpr int V = 16 / sizeof(T);
    // Packets of V elements need every row start aligned to V elements in every tensor
    // (weight packets too: V of W may be wider than 16 bytes, which Packed allows).
    const bool packed = can_pack<V>(p.n, {{p.x, p.sx}, {p.r, p.sr}, {p.s, p.ss}}, sizeof(T)) &&
                        can_pack<V>(p.n, {{p.y, p.sy}}, sizeof(Y)) && can_pack<V>(p.n, {{p.w, 0}, {p.b, 0}}, sizeof(W));
    const bool pdl = norm_pdl(x.get_device_index());
    if (packed) {
      launch_fwd<T, W, Y, V>(p, stream, pdl);
    } else {  // odd N or unaligned rows: element accesses, streaming path
      launch_norm(norm_act_fwd_stream_kernel<T, W, Y, 1>, dim3(grid_rows(p.m)), dim3(kMaxThreads), 0, stream, pdl,
                  1, p);
    }
  });
}

}  // namespace
}  // namespace fusedops

// The op: outputs allocated here, any leading shape (csrc/norm_ops.h).
namespace fusedops {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_act_forward(Tensor x, std::optional<Tensor> r,
                                                            std::optional<Tensor> w, std::optional<Tensor> b,
                                                            double eps, int64_t act, bool rms, int64_t mode,
                                                            std::optional<ScalarType> y_dtype) {
  STD_TORCH_CHECK(x.is_cuda(), "fusedops_C::norm_act_fwd (CUDA): x must be a CUDA tensor");
  return norm::forward(norm_act_fwd, x, r, std::move(w), std::move(b), eps, act, rms, mode, y_dtype);
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("norm_act_fwd", TORCH_BOX(&fusedops::norm_act_forward));
}
