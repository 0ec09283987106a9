// In-place add on CUDA tensors: x += alpha * y, math in fp32, result rounded to x's dtype.
//
// Memory-bound: 2 reads + 1 write per element. Each thread moves kUnroll 16-byte packets
// of x (and the matching packets of y) with all loads issued before the first store.
#include "cuda_utils.cuh"
#include "../multi_tensor.h"

#include <algorithm>
#include <vector>

namespace fusedops {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename TX>
constexpr int pack_of() { return 16 / static_cast<int>(sizeof(TX)); }  // 4 fp32, 8 fp16/bf16

template <typename TX, typename TY>
__device__ __forceinline__ TX axpy(TX x, TY y, float alpha) {
  return static_cast<TX>(static_cast<float>(x) + alpha * static_cast<float>(y));
}

// Packed path: x and y aligned to their packet size, and the period (when y repeats)
// a multiple of the packet. The < V-element tail is done by the first block.
// x and y may alias exactly (x += alpha * x): each packet is read before it is written.
template <typename TX, typename TY, bool kPeriodic>
__global__ void __launch_bounds__(kThreads)
add_packed_kernel(TX* x, const TY* y, int64_t n, int64_t period, float alpha) {
  constexpr int V = pack_of<TX>();
  using PX = Packed<TX, V>;
  using PY = Packed<TY, V>;
  const int64_t npack = n / V;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  PX xv[kUnroll];
  PY yv[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = base + static_cast<int64_t>(u) * kThreads;
    if (p < npack) {
      xv[u] = reinterpret_cast<const PX*>(x)[p];
      yv[u] = reinterpret_cast<const PY*>(y)[kPeriodic ? p % (period / V) : p];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = base + static_cast<int64_t>(u) * kThreads;
    if (p < npack) {
#pragma unroll
      for (int k = 0; k < V; ++k) xv[u].v[k] = axpy(xv[u].v[k], yv[u].v[k], alpha);
      reinterpret_cast<PX*>(x)[p] = xv[u];
    }
  }
  if (blockIdx.x == 0 && threadIdx.x < n - npack * V) {
    const int64_t i = npack * V + threadIdx.x;
    x[i] = axpy(x[i], y[kPeriodic ? i % period : i], alpha);
  }
}

// Any alignment: one element per access.
template <typename TX, typename TY, bool kPeriodic>
__global__ void __launch_bounds__(kThreads)
add_scalar_kernel(TX* x, const TY* y, int64_t n, int64_t period, float alpha) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * kThreads;
    if (i < n) x[i] = axpy(x[i], y[kPeriodic ? i % period : i], alpha);
  }
}

void add_(Tensor x, Tensor y, double alpha) {
  STD_TORCH_CHECK(x.is_cuda() && y.is_cuda() && x.get_device_index() == y.get_device_index(),
                  "fusedops_C::add_ (CUDA): x and y must be on the same CUDA device");
  STD_TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "fusedops_C::add_ (CUDA): x and y must be contiguous");
  const int64_t n = x.numel(), m = y.numel();
  STD_TORCH_CHECK(m == n || (m > 0 && n % m == 0),
                  "fusedops_C::add_ (CUDA): y.numel() must equal or divide x.numel()");
  if (n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  cudaStream_t stream = current_stream(x.get_device_index());
  const bool periodic = m != n;
  const float a = static_cast<float>(alpha);
  dispatch_float2(x.scalar_type(), "x", y.scalar_type(), "y", [&]<typename TX, typename TY>() {
    constexpr int V = pack_of<TX>();
    TX* xp = x.mutable_data_ptr<TX>();
    const TY* yp = y.const_data_ptr<TY>();
    const bool packed = aligned_to(xp, sizeof(TX) * V) && aligned_to(yp, sizeof(TY) * V) &&
                        (!periodic || m % V == 0);
    const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll * (packed ? V : 1);
    const int64_t blocks = std::max<int64_t>(1, (n + per_block - 1) / per_block);
    STD_TORCH_CHECK(blocks < (int64_t{1} << 31), "fusedops_C::add_ (CUDA): tensor too large");
    const dim3 grid(static_cast<unsigned>(blocks));
    if (packed) {
      if (periodic) add_packed_kernel<TX, TY, true><<<grid, kThreads, 0, stream>>>(xp, yp, n, m, a);
      else add_packed_kernel<TX, TY, false><<<grid, kThreads, 0, stream>>>(xp, yp, n, m, a);
    } else {
      if (periodic) add_scalar_kernel<TX, TY, true><<<grid, kThreads, 0, stream>>>(xp, yp, n, m, a);
      else add_scalar_kernel<TX, TY, false><<<grid, kThreads, 0, stream>>>(xp, yp, n, m, a);
    }
    FUSEDOPS_CHECK_LAUNCH();
  });
}

// ---- multi-tensor: many (x, y) pairs in one launch -------------------------------------
//
// The table of pointers and sizes travels as a kernel parameter (large parameter space,
// CUDA >= 12.1, sm_70+), so a launch needs no host-to-device copy and is graph-capturable.
// Each block handles one chunk of one tensor; it finds its tensor by binary search over
// the chunk prefix sums (uniform across the block: broadcast reads of the parameter bank).
constexpr int kMaxTensors = 384;

struct ForeachTable {
  void* x[kMaxTensors];
  const void* y[kMaxTensors];
  int64_t n[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];
  int count;
};

template <typename TX, typename TY>
__global__ void __launch_bounds__(kThreads) foreach_add_kernel(const __grid_constant__ ForeachTable table, float alpha) {
  constexpr int V = pack_of<TX>();
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kUnroll * V;
  using PX = Packed<TX, V>;
  using PY = Packed<TY, V>;
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = table.count - 1;  // last t with first_chunk[t] <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  const int t = lo;
  TX* x = static_cast<TX*>(table.x[t]);
  const TY* y = static_cast<const TY*>(table.y[t]);
  const int64_t start = (chunk - table.first_chunk[t]) * kChunk;
  const int64_t len = min(kChunk, table.n[t] - start);
  x += start;
  y += start;
  if (len == kChunk && aligned_to(x, sizeof(TX) * V) && aligned_to(y, sizeof(TY) * V)) {
    PX xv[kUnroll];
    PY yv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = reinterpret_cast<const PX*>(x)[threadIdx.x + u * kThreads];
      yv[u] = reinterpret_cast<const PY*>(y)[threadIdx.x + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) xv[u].v[k] = axpy(xv[u].v[k], yv[u].v[k], alpha);
      reinterpret_cast<PX*>(x)[threadIdx.x + u * kThreads] = xv[u];
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kThreads) x[i] = axpy(x[i], y[i], alpha);
  }
}

// Returns false, writing nothing, when the lists are not plain (see multi_tensor.h).
bool foreach_add_(std::vector<Tensor> xs, std::vector<Tensor> ys, double alpha) {
  if (!plain_pairs(xs, ys) || !xs[0].is_cuda()) return false;
  const int32_t device = xs[0].get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(device);
  const float a = static_cast<float>(alpha);
  dispatch_float2(xs[0].scalar_type(), "xs", ys[0].scalar_type(), "ys", [&]<typename TX, typename TY>() {
    constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kUnroll * pack_of<TX>();
    ForeachTable table{};
    auto launch = [&]() {
      const int64_t chunks = table.first_chunk[table.count];
      if (chunks == 0) return;
      foreach_add_kernel<TX, TY><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(table, a);
      FUSEDOPS_CHECK_LAUNCH();
    };
    for (size_t t = 0; t < xs.size(); ++t) {
      const int64_t n = xs[t].numel();
      if (n == 0) continue;
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      // A full table, or a grid that would pass 2^31 blocks, goes out as its own launch.
      if (table.count == kMaxTensors || table.first_chunk[table.count] + chunks >= (int64_t{1} << 31)) {
        launch();
        table.count = 0;
      }
      const int c = table.count;
      table.x[c] = xs[t].data_ptr();
      table.y[c] = ys[t].data_ptr();
      table.n[c] = n;
      table.first_chunk[c + 1] = table.first_chunk[c] + chunks;
      table.count = c + 1;
    }
    if (table.count > 0) launch();
  });
  return true;
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("add_", TORCH_BOX(&fusedops::add_));
  m.impl("foreach_add_", TORCH_BOX(&fusedops::foreach_add_));
}
