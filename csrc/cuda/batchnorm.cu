// BatchNorm(+activation) kernels on CUDA tensors for a conv output y [N, C, H·W] (see
// csrc/batchnorm.cpp for the contract), the CUDA C++ twin of triton_kernels/batchnorm.py.
//
// Reductions are deterministic: a 2-D grid (row splits × channel groups) writes fp32
// partials per split — per-thread Welford, then Chan combines in a fixed tree order in
// shared memory — and a finalize kernel combines the splits in order. No atomics.
// Layout: channels_last (stride(1) == 1) puts 32 neighbouring channels on a warp's lanes
// and rows on the warp index; NCHW gives a block one channel and its threads rows (H·W
// is the contiguous run). Elementwise kernels walk elements in memory order.
#include "cuda_utils.cuh"
#include "../batchnorm_act.h"

#include <algorithm>

namespace fusedops {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 32;                       // channels per block (channels_last)
constexpr int kRowsCL = kThreads / kLanes;       // row groups per block (channels_last)

struct Geo {
  int64_t n, c, hw, sn, sc, shw;
};

Geo geometry(const Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), t.stride(0), t.stride(1), t.stride(3)};
}

__device__ __forceinline__ int64_t row_offset(const Geo& g, int64_t r) {
  if (g.sn == g.hw * g.shw) return r * g.shw;  // rows evenly spaced (channels_last dense): no division
  const int64_t n = r / g.hw;
  return n * g.sn + (r - n * g.hw) * g.shw;
}

__device__ __forceinline__ void chan(float& mean, float& m2, float& cnt, float bm, float bm2, float bc) {
  const float tot = cnt + bc;
  if (tot == 0.f) return;
  const float d = bm - mean;
  mean += d * (bc / tot);
  m2 += bm2 + d * d * (cnt * bc / tot);
  cnt = tot;
}

// Thread layout: lane = channel (CL) or row (NCHW). Returns (channel, first row, row step).
template <bool kCL>
__device__ __forceinline__ void thread_slot(int64_t& c, int64_t& r0, int64_t& step, int64_t split_start) {
  if constexpr (kCL) {
    c = static_cast<int64_t>(blockIdx.y) * kLanes + (threadIdx.x % kLanes);
    r0 = split_start + threadIdx.x / kLanes;
    step = kRowsCL;
  } else {
    c = blockIdx.y;
    r0 = split_start + threadIdx.x;
    step = kThreads;
  }
}

// Combines the block's per-thread values of a channel in a fixed tree order: threads that
// share a channel are `stride` apart (kLanes in CL, 1 in NCHW). Result in thread `first`.
template <bool kCL, typename Combine>
__device__ __forceinline__ void block_tree(float* sh, int nvals, Combine&& combine) {
  constexpr int group = kCL ? kRowsCL : kThreads;   // threads per channel
  constexpr int stride = kCL ? kLanes : 1;
  for (int width = group / 2; width >= 1; width /= 2) {
    __syncthreads();
    const int t = threadIdx.x;
    const int idx = kCL ? t / kLanes : t;
    if (idx < width) combine(sh, t, t + width * stride);
    (void)nvals;
  }
  __syncthreads();
}

template <typename T, bool kCL>
__global__ void __launch_bounds__(kThreads)
stats_partial_kernel(const T* __restrict__ y, Geo g, int64_t rows_per_split, float* __restrict__ part) {
  __shared__ float sh[3 * kThreads];
  const int64_t m = g.n * g.hw;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * rows_per_split;
  const int64_t end = min(start + rows_per_split, m);
  int64_t c, r, step;
  thread_slot<kCL>(c, r, step, start);
  float mean = 0.f, m2 = 0.f, cnt = 0.f;
  auto welford = [&](float v) {
    cnt += 1.f;
    const float d = v - mean;
    mean += d / cnt;
    m2 += d * (v - mean);
  };
  if (c < g.c) {
    constexpr int kUnroll = 4;  // independent loads in flight; the same update order as one at a time
    const T* yc = y + c * g.sc;
    for (; r + (kUnroll - 1) * step < end; r += kUnroll * step) {
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = static_cast<float>(yc[row_offset(g, r + u * step)]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) welford(v[u]);
    }
    for (; r < end; r += step) welford(static_cast<float>(yc[row_offset(g, r)]));
  }
  float* sm = sh;
  float* sm2 = sh + kThreads;
  float* sc = sh + 2 * kThreads;
  sm[threadIdx.x] = mean;
  sm2[threadIdx.x] = m2;
  sc[threadIdx.x] = cnt;
  block_tree<kCL>(sh, 3, [&](float* s, int a, int b) {
    float am = s[a], am2 = s[kThreads + a], ac = s[2 * kThreads + a];
    chan(am, am2, ac, s[b], s[kThreads + b], s[2 * kThreads + b]);
    s[a] = am;
    s[kThreads + a] = am2;
    s[2 * kThreads + a] = ac;
  });
  const bool leader = kCL ? threadIdx.x < kLanes : threadIdx.x == 0;
  if (leader && c < g.c) {
    const int64_t splits = gridDim.x;
    part[blockIdx.x * g.c + c] = sm[threadIdx.x];
    part[(splits + blockIdx.x) * g.c + c] = sm2[threadIdx.x];
  }
}

// Finalize kernels: a block per kLanes channels; its kRowsCL warps each combine every
// kRowsCL-th split in order, then a fixed tree combines the warps (deterministic).
__global__ void __launch_bounds__(kThreads)
stats_finalize_kernel(const float* __restrict__ part, int64_t m, int64_t c_total, int64_t splits,
                      int64_t rows_per_split, float eps, float* mean_out, float* invstd_out, float* var_out) {
  __shared__ float sh[3 * kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanes + (threadIdx.x % kLanes);
  float mean = 0.f, m2 = 0.f, cnt = 0.f;
  if (c < c_total) {
    for (int64_t s = threadIdx.x / kLanes; s < splits; s += kRowsCL) {
      const float k = static_cast<float>(min(m - s * rows_per_split, rows_per_split));
      chan(mean, m2, cnt, part[s * c_total + c], part[(splits + s) * c_total + c], k);
    }
  }
  sh[threadIdx.x] = mean;
  sh[kThreads + threadIdx.x] = m2;
  sh[2 * kThreads + threadIdx.x] = cnt;
  block_tree<true>(sh, 3, [&](float* q, int a, int b) {
    float am = q[a], am2 = q[kThreads + a], ac = q[2 * kThreads + a];
    chan(am, am2, ac, q[b], q[kThreads + b], q[2 * kThreads + b]);
    q[a] = am;
    q[kThreads + a] = am2;
    q[2 * kThreads + a] = ac;
  });
  if (threadIdx.x < kLanes && c < c_total) {
    const float var = sh[kThreads + threadIdx.x] / sh[2 * kThreads + threadIdx.x];
    mean_out[c] = sh[threadIdx.x];
    var_out[c] = var;
    invstd_out[c] = rsqrtf(var + eps);
  }
}

struct Affine {
  const float *mean, *invstd, *w, *b;
};

// Element i in memory order -> (n, c, p) -> offsets through the strides of each tensor.
template <bool kCL>
__device__ __forceinline__ void element(const Geo& g, int64_t i, int64_t& n, int64_t& c, int64_t& p) {
  const int64_t per_n = g.c * g.hw;
  n = i / per_n;
  const int64_t rem = i - n * per_n;
  if constexpr (kCL) {
    p = rem / g.c;
    c = rem - p * g.c;
  } else {
    c = rem / g.hw;
    p = rem - c * g.hw;
  }
}

template <typename T, bool kCL>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ y, T* __restrict__ z, Geo g, Affine a, int act, float slope, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, p;
    element<kCL>(g, i, n, c, p);
    const int64_t o = n * g.sn + c * g.sc + p * g.shw;
    const float scale = a.invstd[c] * a.w[c];
    const float shift = a.b[c] - a.mean[c] * scale;
    z[o] = static_cast<T>(bn_act(static_cast<float>(y[o]) * scale + shift, act, slope));
  }
}

template <typename T, typename TD>
__device__ __forceinline__ float grad_at(const T* y, const TD* dz, const Geo& g, const Geo& gd, int64_t r, int64_t c,
                                         const Affine& a, int act, float slope, float& xhat) {
  const int64_t n = r / g.hw, p = r - n * g.hw;
  xhat = (static_cast<float>(y[n * g.sn + c * g.sc + p * g.shw]) - a.mean[c]) * a.invstd[c];
  return static_cast<float>(dz[n * gd.sn + c * gd.sc + p * gd.shw]) * bn_act_grad(xhat * a.w[c] + a.b[c], act, slope);
}

template <typename T, typename TD, bool kCL>
__global__ void __launch_bounds__(kThreads)
bwd_partial_kernel(const T* __restrict__ y, const TD* __restrict__ dz, Geo g, Geo gd, Affine a, int act, float slope,
                   int64_t rows_per_split, float* __restrict__ part) {
  __shared__ float sh[2 * kThreads];
  const int64_t m = g.n * g.hw;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * rows_per_split;
  const int64_t end = min(start + rows_per_split, m);
  int64_t c, r, step;
  thread_slot<kCL>(c, r, step, start);
  float sg = 0.f, sgx = 0.f;
  if (c < g.c) {
    for (; r < end; r += step) {
      float xhat;
      const float gg = grad_at(y, dz, g, gd, r, c, a, act, slope, xhat);
      sg += gg;
      sgx += gg * xhat;
    }
  }
  sh[threadIdx.x] = sg;
  sh[kThreads + threadIdx.x] = sgx;
  block_tree<kCL>(sh, 2, [&](float* s, int x, int w) {
    s[x] += s[w];
    s[kThreads + x] += s[kThreads + w];
  });
  const bool leader = kCL ? threadIdx.x < kLanes : threadIdx.x == 0;
  if (leader && c < g.c) {
    const int64_t splits = gridDim.x;
    part[blockIdx.x * g.c + c] = sh[threadIdx.x];
    part[(splits + blockIdx.x) * g.c + c] = sh[kThreads + threadIdx.x];
  }
}

__global__ void __launch_bounds__(kThreads)
bwd_finalize_kernel(const float* __restrict__ part, int64_t c_total, int64_t splits, float* sum_g, float* sum_gx) {
  __shared__ float sh[2 * kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanes + (threadIdx.x % kLanes);
  float a = 0.f, b = 0.f;
  if (c < c_total) {
    for (int64_t s = threadIdx.x / kLanes; s < splits; s += kRowsCL) {
      a += part[s * c_total + c];
      b += part[(splits + s) * c_total + c];
    }
  }
  sh[threadIdx.x] = a;
  sh[kThreads + threadIdx.x] = b;
  block_tree<true>(sh, 2, [&](float* q, int x, int w) {
    q[x] += q[w];
    q[kThreads + x] += q[kThreads + w];
  });
  if (threadIdx.x < kLanes && c < c_total) {
    sum_g[c] = sh[threadIdx.x];
    sum_gx[c] = sh[kThreads + threadIdx.x];
  }
}

template <typename T, typename TD, bool kCL>
__global__ void __launch_bounds__(kThreads)
dy_kernel(const T* __restrict__ y, const TD* __restrict__ dz, T* __restrict__ dy, Geo g, Geo gd, Affine a, int act,
          float slope, const float* __restrict__ sum_g, const float* __restrict__ sum_gx, int64_t total) {
  const float inv_m = 1.f / static_cast<float>(g.n * g.hw);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, p;
    element<kCL>(g, i, n, c, p);
    float xhat;
    const float gg = grad_at(y, dz, g, gd, n * g.hw + p, c, a, act, slope, xhat);
    dy[n * g.sn + c * g.sc + p * g.shw] =
        static_cast<T>(a.w[c] * a.invstd[c] * (gg - sum_g[c] * inv_m - xhat * sum_gx[c] * inv_m));
  }
}

// ---- host ---------------------------------------------------------------------------------

int sm_count(int32_t device) {
  int sms = 0;
  FUSEDOPS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// (splits, rows_per_split): about 4 blocks per SM over all channel groups, >= 1024 rows each.
void split_rows(int64_t m, int64_t groups, int32_t device, int64_t& splits, int64_t& rows) {
  const int64_t target = std::max<int64_t>(1, 4 * sm_count(device) / std::max<int64_t>(groups, 1));
  splits = std::max<int64_t>(1, std::min<int64_t>(target, m / 1024));
  rows = (m + splits - 1) / splits;
  splits = (m + rows - 1) / rows;
}

unsigned elementwise_grid(int64_t total, int32_t device) {
  const int64_t want = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, 32LL * sm_count(device))));
}

void check_cuda(const Tensor& t, const char* name, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device, "fusedops_C (CUDA): ", name,
                  " must be on the CUDA device of y");
}

void check_channel(const Tensor& t, int64_t c, const char* name, int32_t device) {
  check_cuda(t, name, device);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == c && t.is_contiguous() && t.scalar_type() == ScalarType::Float,
                  "fusedops_C (CUDA): ", name, " must be a contiguous fp32 tensor of shape (C,)");
}

Tensor empty_f32(int64_t rows, int64_t c, const Tensor& like) {
  return torch::stable::new_empty(like, {rows, c}, std::make_optional(ScalarType::Float));
}

void bn_stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var) {
  const int32_t dev = y.get_device_index();
  check_cuda(y, "y", dev);
  STD_TORCH_CHECK(y.dim() == 4, "fusedops_C::bn_stats (CUDA): y must be 4-D");
  const Geo g = geometry(y);
  check_channel(mean, g.c, "mean", dev);
  check_channel(invstd, g.c, "invstd", dev);
  check_channel(var, g.c, "var", dev);
  const int64_t m = g.n * g.hw;
  if (m == 0 || g.c == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const bool cl = g.sc == 1 && g.c > 1;
  const int64_t groups = cl ? (g.c + kLanes - 1) / kLanes : g.c;
  STD_TORCH_CHECK(groups <= 65535, "fusedops_C::bn_stats (CUDA): too many channels for the grid");
  int64_t splits, rows;
  split_rows(m, groups, dev, splits, rows);
  Tensor part = empty_f32(2 * splits, g.c, y);
  float* pp = part.mutable_data_ptr<float>();
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
    if (cl) stats_partial_kernel<T, true><<<grid, kThreads, 0, stream>>>(y.const_data_ptr<T>(), g, rows, pp);
    else stats_partial_kernel<T, false><<<grid, kThreads, 0, stream>>>(y.const_data_ptr<T>(), g, rows, pp);
    FUSEDOPS_CHECK_LAUNCH();
  });
  stats_finalize_kernel<<<static_cast<unsigned>((g.c + kLanes - 1) / kLanes), kThreads, 0, stream>>>(
      pp, m, g.c, splits, rows, static_cast<float>(eps), mean.mutable_data_ptr<float>(),
      invstd.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  FUSEDOPS_CHECK_LAUNCH();
}

Affine affine_of(const Tensor& mean, const Tensor& invstd, const Tensor& w, const Tensor& b) {
  return {mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>()};
}

void bn_act_apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,
                  Tensor z) {
  const int32_t dev = y.get_device_index();
  check_cuda(y, "y", dev);
  check_cuda(z, "z", dev);
  STD_TORCH_CHECK(y.dim() == 4 && z.dim() == 4, "fusedops_C::bn_act_apply (CUDA): y and z must be 4-D");
  const Geo g = geometry(y), gz = geometry(z);
  STD_TORCH_CHECK(g.sn == gz.sn && g.sc == gz.sc && g.shw == gz.shw && z.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_apply (CUDA): z must have y's strides and dtype");
  check_channel(mean, g.c, "mean", dev);
  check_channel(invstd, g.c, "invstd", dev);
  check_channel(weight, g.c, "weight", dev);
  check_channel(bias, g.c, "bias", dev);
  const int64_t total = g.n * g.c * g.hw;
  if (total == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const Affine a = affine_of(mean, invstd, weight, bias);
  const bool cl = g.sc == 1 && g.c > 1;
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    const unsigned grid = elementwise_grid(total, dev);
    if (cl)
      apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(y.const_data_ptr<T>(), z.mutable_data_ptr<T>(), g, a,
                                                           static_cast<int>(act), static_cast<float>(slope), total);
    else
      apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(y.const_data_ptr<T>(), z.mutable_data_ptr<T>(), g, a,
                                                            static_cast<int>(act), static_cast<float>(slope), total);
    FUSEDOPS_CHECK_LAUNCH();
  });
}

void bn_act_backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act,
                     double slope, Tensor dy, Tensor sum_gx, Tensor sum_g) {
  const int32_t dev = y.get_device_index();
  check_cuda(y, "y", dev);
  check_cuda(dz, "dz", dev);
  check_cuda(dy, "dy", dev);
  STD_TORCH_CHECK(y.dim() == 4 && dz.dim() == 4 && dy.dim() == 4,
                  "fusedops_C::bn_act_backward (CUDA): dz, y and dy must be 4-D");
  const Geo g = geometry(y), gd = geometry(dz), gy = geometry(dy);
  STD_TORCH_CHECK(g.sn == gy.sn && g.sc == gy.sc && g.shw == gy.shw && dy.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_backward (CUDA): dy must have y's strides and dtype");
  STD_TORCH_CHECK(gd.n == g.n && gd.c == g.c && gd.hw == g.hw, "fusedops_C::bn_act_backward (CUDA): dz shape");
  check_channel(mean, g.c, "mean", dev);
  check_channel(invstd, g.c, "invstd", dev);
  check_channel(weight, g.c, "weight", dev);
  check_channel(bias, g.c, "bias", dev);
  check_channel(sum_gx, g.c, "sum_gx", dev);
  check_channel(sum_g, g.c, "sum_g", dev);
  const int64_t m = g.n * g.hw, total = m * g.c;
  if (g.c == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const Affine a = affine_of(mean, invstd, weight, bias);
  const bool cl = g.sc == 1 && g.c > 1;
  const int64_t groups = cl ? (g.c + kLanes - 1) / kLanes : g.c;
  STD_TORCH_CHECK(groups <= 65535, "fusedops_C::bn_act_backward (CUDA): too many channels for the grid");
  int64_t splits, rows;
  split_rows(std::max<int64_t>(m, 1), groups, dev, splits, rows);
  Tensor part = empty_f32(2 * splits, g.c, y);
  float* pp = part.mutable_data_ptr<float>();
  const int ai = static_cast<int>(act);
  const float sl = static_cast<float>(slope);
  dispatch_float2(y.scalar_type(), "y", dz.scalar_type(), "dz", [&]<typename T, typename TD>() {
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
    const T* yp = y.const_data_ptr<T>();
    const TD* dzp = dz.const_data_ptr<TD>();
    if (cl) bwd_partial_kernel<T, TD, true><<<grid, kThreads, 0, stream>>>(yp, dzp, g, gd, a, ai, sl, rows, pp);
    else bwd_partial_kernel<T, TD, false><<<grid, kThreads, 0, stream>>>(yp, dzp, g, gd, a, ai, sl, rows, pp);
    FUSEDOPS_CHECK_LAUNCH();
    bwd_finalize_kernel<<<static_cast<unsigned>((g.c + kLanes - 1) / kLanes), kThreads, 0, stream>>>(
        pp, g.c, splits, sum_g.mutable_data_ptr<float>(), sum_gx.mutable_data_ptr<float>());
    FUSEDOPS_CHECK_LAUNCH();
    if (total == 0) return;
    const unsigned eg = elementwise_grid(total, dev);
    T* dyp = dy.mutable_data_ptr<T>();
    if (cl)
      dy_kernel<T, TD, true><<<eg, kThreads, 0, stream>>>(yp, dzp, dyp, g, gd, a, ai, sl, sum_g.const_data_ptr<float>(),
                                                          sum_gx.const_data_ptr<float>(), total);
    else
      dy_kernel<T, TD, false><<<eg, kThreads, 0, stream>>>(yp, dzp, dyp, g, gd, a, ai, sl,
                                                           sum_g.const_data_ptr<float>(),
                                                           sum_gx.const_data_ptr<float>(), total);
    FUSEDOPS_CHECK_LAUNCH();
  });
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("bn_stats", TORCH_BOX(&fusedops::bn_stats));
  m.impl("bn_act_apply", TORCH_BOX(&fusedops::bn_act_apply));
  m.impl("bn_act_backward", TORCH_BOX(&fusedops::bn_act_backward));
}
