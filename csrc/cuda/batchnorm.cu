// BatchNorm(+activation) kernels on CUDA tensors for a conv output y [N, C, H·W] (see
// csrc/batchnorm.cpp for the contract), the CUDA C++ twin of triton_kernels/batchnorm.py.
//
// One tiling for every kernel, chosen on the host (Tile):
// - channels_last (stride(1) == 1): a "row" is one (n, h·w) position, its C channels
//   contiguous. A block is `lanes` threads along C × `rows` row groups (lanes · rows =
//   256); each thread owns VEC neighbouring channels (VEC = 16 bytes / element size when
//   C, the strides and the pointers allow one 16-byte access, else 1) and walks the rows
//   of its block's split, kUnroll rows' loads in flight. Its channels' parameters sit in
//   registers; there is no per-element index arithmetic. With 16-byte accesses the
//   backward kernels, whose per-channel constants leave registers for only 2 rows of loads,
//   stage the rows ahead in a shared-memory ring instead (ring_rows: cp.async,
//   kRingStages − 1 rows in flight).
// - NCHW (stride(3) is the H·W stride): a block is one channel (grid.y) and a split of its
//   N·H·W elements, in VEC-element vectors along H·W (VEC > 1 when H·W and the strides
//   allow it).
// Grid: (splits, channel groups), sized for a few resident blocks per SM.
// The apply and backward kernels are built once for the piecewise-linear activations
// (switched on per element) and once for each smooth one (csrc/batchnorm_act.h).
// Reductions are deterministic: per-thread accumulation in a fixed order (Welford for the
// statistics), a fixed tree over the block's row groups in shared memory, one fp32
// partial per split, and finalize kernels that combine the splits in order. No atomics.
#include "cuda_utils.cuh"
#include "../batchnorm_act.h"
#include "../batchnorm_kernels.h"

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace fusedops {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
// Rows in flight of the backward kernels where they load into registers (no ring: NCHW, or
// channels_last without 16-byte accesses): they hold more per-channel constants, so 8-wide
// vectors keep 2 rows' loads in flight to stay within 128 registers (2 blocks of 256 a SM).
template <int V>
constexpr int kBwdUnroll = V >= 8 ? 2 : 4;
constexpr int kFinLanes = 8;                      // finalize: channels per block
constexpr int kFinThreads = 1024;
constexpr int kFinRows = kFinThreads / kFinLanes;  // finalize: split groups per block
// Stages of the shared-memory ring that feeds the channels_last 16-byte backward kernels
// (ring_rows): kRingStages − 1 rows a thread in flight, held in no register.
constexpr int kRingStages = 4;

struct Geo {
  int64_t n, c, hw, sn, sc, shw;
};

Geo geometry(const Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), t.stride(0), t.stride(1), t.stride(3)};
}

struct Tile {
  int lanes;          // threads along C (channels_last, a power of two <= 32); 1 for NCHW
  int rows;           // kThreads / lanes: row groups (channels_last) or threads (NCHW)
  int64_t per_split;  // units per split
  int64_t units;      // channels_last: rows N·H·W; NCHW: vectors per channel N·H·W / VEC
  int64_t hwv;        // NCHW: vectors per plane H·W / VEC
};

// Offset of unit u (a row, or a vector of a channel's plane) at channel c0.
template <bool kCL, int V>
__device__ __forceinline__ int64_t offset_of(const Geo& g, const Tile& tl, int64_t u, int64_t c0) {
  if constexpr (kCL) {
    if (g.sn == g.hw * g.shw) return u * g.shw + c0 * g.sc;  // rows evenly spaced: no division
    const int64_t n = u / g.hw;
    return n * g.sn + (u - n * g.hw) * g.shw + c0 * g.sc;
  } else {
    int64_t n, p;
    if (tl.units <= 0xffffffffLL) {
      const uint32_t uu = static_cast<uint32_t>(u), h = static_cast<uint32_t>(tl.hwv);
      n = uu / h;
      p = uu - static_cast<uint32_t>(n) * h;
    } else {
      n = u / tl.hwv;
      p = u - n * tl.hwv;
    }
    return n * g.sn + c0 * g.sc + p * V * g.shw;
  }
}

// Thread slot: first channel, first unit (relative to the split) and unit step.
template <bool kCL, int V>
__device__ __forceinline__ void slot(const Tile& tl, int64_t& c0, int64_t& u, int64_t& step) {
  if constexpr (kCL) {
    c0 = (static_cast<int64_t>(blockIdx.y) * tl.lanes + threadIdx.x % tl.lanes) * V;
    u = threadIdx.x / tl.lanes;
    step = tl.rows;
  } else {
    c0 = blockIdx.y;
    u = threadIdx.x;
    step = kThreads;
  }
}

template <typename T, int V>
__device__ __forceinline__ void to_float(const Packed<T, V>& v, float (&out)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(v.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<float>(*p);
  } else {
    const Packed<T, V> v = *reinterpret_cast<const Packed<T, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<float>(v.v[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    *p = static_cast<T>(in[0]);
  } else {
    Packed<T, V> v;
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Packed<T, V>*>(p) = v;
  }
}

__device__ __forceinline__ void chan(float& mean, float& m2, float& cnt, float bm, float bm2, float bc) {
  const float tot = cnt + bc;
  if (tot == 0.f) return;
  const float d = bm - mean;
  mean += d * (bc / tot);
  m2 += bm2 + d * d * (cnt * bc / tot);
  cnt = tot;
}

// Fixed-order tree over the block's row groups: threads of one channel set are `lanes`
// apart; combine(a, b) folds thread b's values into thread a's. Result in row group 0.
template <typename Combine>
__device__ __forceinline__ void block_tree(int lanes, int rows, Combine&& combine) {
  const int t = threadIdx.x;
  const int idx = t / lanes;
  for (int width = rows / 2; width >= 1; width /= 2) {
    __syncthreads();
    if (idx < width) combine(t, t + width * lanes);
  }
  __syncthreads();
}

// Streams a thread's rows u, u + step, ... (< end) through a ring of kStages slots in shared
// memory, kStages − 1 rows ahead (cp.async: the loads in flight hold no registers, so the
// bytes in flight are not bounded by the kernel's register count). A row is kStreams 16-byte
// packets, stream k's at src(k, row); body(row, slot) reads them at slot[k * kThreads]. A
// thread touches only its own slots, and refills the slot it read a row earlier.
template <int kStages, int kStreams, typename Src, typename Body>
__device__ __forceinline__ void ring_rows(uint4* ring, int64_t u, int64_t end, int64_t step, Src&& src, Body&& body) {
  uint4* mine = ring + threadIdx.x;
  auto issue = [&](int s, int64_t r) {
    if (r < end) {
#pragma unroll
      for (int k = 0; k < kStreams; ++k) cp_async16(mine + (s * kStreams + k) * kThreads, src(k, r));
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s, u + s * step);
  for (int s = 0; u < end; u += step) {
    issue(s == 0 ? kStages - 1 : s - 1, u + (kStages - 1) * step);
    cp_async_wait<kStages - 1>();
    body(u, static_cast<const uint4*>(mine + s * kStreams * kThreads));
    s = s + 1 == kStages ? 0 : s + 1;
  }
  cp_async_wait<0>();
}

template <typename T, int V>
__device__ __forceinline__ void from_slot(const uint4* slot, float (&out)[V]) {
  to_float<T, V>(*reinterpret_cast<const Packed<T, V>*>(slot), out);
}

// ---- statistics ----------------------------------------------------------------------------

template <typename T, bool kCL, int V>
__global__ void __launch_bounds__(kThreads)
stats_partial_kernel(const T* __restrict__ y, Geo g, Tile tl, float* __restrict__ part) {
  constexpr int NC = kCL ? V : 1;  // channels per thread
  __shared__ float sh[(2 * NC + 1) * kThreads];
  int64_t c0, u, step;
  slot<kCL, V>(tl, c0, u, step);
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tl.per_split;
  const int64_t end = min(start + tl.per_split, tl.units);
  u += start;
  float mean[NC], m2[NC], cnt = 0.f;
#pragma unroll
  for (int k = 0; k < NC; ++k) mean[k] = m2[k] = 0.f;
  auto add = [&](const float (&v)[V]) {
    if constexpr (kCL) {  // one row: V channels, one count
      cnt += 1.f;
      const float inv = 1.f / cnt;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = v[k] - mean[k];
        mean[k] += d * inv;
        m2[k] += d * (v[k] - mean[k]);
      }
    } else {  // V elements of one channel: their mean and M2, then a Chan combine
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) s += v[k];
      const float bm = s * (1.f / V);
      float bm2 = 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) bm2 += (v[k] - bm) * (v[k] - bm);
      chan(mean[0], m2[0], cnt, bm, bm2, static_cast<float>(V));
    }
  };
  if (c0 < g.c) {
    for (; u + (kUnroll - 1) * step < end; u += kUnroll * step) {
      Packed<T, V> r[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) r[q] = load_raw<T, V>(y + offset_of<kCL, V>(g, tl, u + q * step, c0));
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        float v[V];
        to_float<T, V>(r[q], v);
        add(v);
      }
    }
    for (; u < end; u += step) {
      float v[V];
      load<T, V>(y + offset_of<kCL, V>(g, tl, u, c0), v);
      add(v);
    }
  }
  const int t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    sh[k * kThreads + t] = mean[k];
    sh[(NC + k) * kThreads + t] = m2[k];
  }
  sh[2 * NC * kThreads + t] = cnt;
  block_tree(kCL ? tl.lanes : 1, tl.rows, [&](int a, int b) {
    float ca = sh[2 * NC * kThreads + a];
    const float cb = sh[2 * NC * kThreads + b];
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      float m = sh[k * kThreads + a], q = sh[(NC + k) * kThreads + a], c = ca;
      chan(m, q, c, sh[k * kThreads + b], sh[(NC + k) * kThreads + b], cb);
      sh[k * kThreads + a] = m;
      sh[(NC + k) * kThreads + a] = q;
    }
    sh[2 * NC * kThreads + a] = ca + cb;
  });
  const bool leader = kCL ? t < tl.lanes : t == 0;
  if (leader && c0 < g.c) {
    const int64_t splits = gridDim.x;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      part[blockIdx.x * g.c + c0 + k] = sh[k * kThreads + t];
      part[(splits + blockIdx.x) * g.c + c0 + k] = sh[(NC + k) * kThreads + t];
    }
  }
}

// A block per kFinLanes channels; kFinRows groups of threads each take every kFinRows-th
// split in order (loads batched), then a fixed tree sums the groups. The splits' (mean, M2)
// are combined as sums about split 0's mean r (no division a split): with n_s elements in
// split s and d_s = mean_s − r, S1 = Σ n_s·d_s and S2 = Σ (M2_s + n_s·d_s²) give
// mean = r + S1 / n and M2 = S2 − S1² / n, which is Chan's combine of every split at once.
// Split s holds min(per_split, units − s·per_split) · unit_elems elements per channel.
__global__ void __launch_bounds__(kFinThreads)
stats_finalize_kernel(const float* __restrict__ part, int64_t c_total, int64_t splits, int64_t per_split,
                      int64_t units, float unit_elems, float eps, float* mean_out, float* invstd_out,
                      float* var_out, float* run_mean, float* run_var, float momentum, float unbias) {
  __shared__ float sh[2 * kFinThreads];
  const int t = threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinLanes + t % kFinLanes;
  float s1 = 0.f, s2 = 0.f, ref = 0.f;
  if (c < c_total) {
    ref = part[c];
    for (int64_t s = t / kFinLanes; s < splits; s += kUnroll * kFinRows) {
      float pm[kUnroll], pq[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t ss = s + q * kFinRows;
        pm[q] = ss < splits ? part[ss * c_total + c] : 0.f;
        pq[q] = ss < splits ? part[(splits + ss) * c_total + c] : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t ss = s + q * kFinRows;
        if (ss < splits) {
          const float n = static_cast<float>(min(per_split, units - ss * per_split)) * unit_elems;
          const float d = pm[q] - ref;
          s1 = fmaf(n, d, s1);
          s2 += fmaf(n * d, d, pq[q]);
        }
      }
    }
  }
  sh[t] = s1;
  sh[kFinThreads + t] = s2;
  block_tree(kFinLanes, kFinRows, [&](int x, int w) {
    sh[x] += sh[w];
    sh[kFinThreads + x] += sh[kFinThreads + w];
  });
  if (t < kFinLanes && c < c_total) {
    const float n = static_cast<float>(units) * unit_elems;
    const float d = sh[t] / n;
    const float mean = ref + d;
    const float var = fmaxf(sh[kFinThreads + t] - sh[t] * d, 0.f) / n;
    mean_out[c] = mean;
    var_out[c] = var;
    invstd_out[c] = rsqrtf(var + eps);
    if (run_mean != nullptr) {  // eager's running-statistics update, in this launch
      run_mean[c] = bn_lerp(run_mean[c], mean, momentum);
      run_var[c] = bn_lerp(run_var[c], var * unbias, momentum);
    }
  }
}

// ---- apply ---------------------------------------------------------------------------------

struct Affine {
  const float *mean, *invstd, *w, *b;
};

// y and z may be the same tensor (in-place epilogue): each thread reads its elements
// before it writes them, so no __restrict__ on them.
template <typename T, bool kCL, int V, int kBuild>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* y, T* z, Geo g, Tile tl, Affine a, int act, float slope) {
  constexpr int NC = kCL ? V : 1;
  int64_t c0, u, step;
  slot<kCL, V>(tl, c0, u, step);
  if (c0 >= g.c) return;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tl.per_split;
  const int64_t end = min(start + tl.per_split, tl.units);
  u += start;
  float scale[NC], shift[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    scale[k] = a.invstd[c0 + k] * a.w[c0 + k];
    shift[k] = a.b[c0 + k] - a.mean[c0 + k] * scale[k];
  }
  auto op = [&](float (&v)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = bn_act<kBuild>(v[k] * scale[kCL ? k : 0] + shift[kCL ? k : 0], act, slope);
  };
  for (; u + (kUnroll - 1) * step < end; u += kUnroll * step) {
    Packed<T, V> r[kUnroll];
    int64_t o[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      o[q] = offset_of<kCL, V>(g, tl, u + q * step, c0);
      r[q] = load_raw<T, V>(y + o[q]);
    }
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      float v[V];
      to_float<T, V>(r[q], v);
      op(v);
      store<T, V>(z + o[q], v);
    }
  }
  for (; u < end; u += step) {
    float v[V];
    const int64_t o = offset_of<kCL, V>(g, tl, u, c0);
    load<T, V>(y + o, v);
    op(v);
    store<T, V>(z + o, v);
  }
}

// ---- backward ------------------------------------------------------------------------------

// Per-channel constants of the backward, in registers for the thread's channels.
template <int NC>
struct BwdParams {
  float mean[NC], invstd[NC], w[NC], b[NC];
  __device__ __forceinline__ void load(const Affine& a, int64_t c0) {
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      mean[k] = a.mean[c0 + k];
      invstd[k] = a.invstd[c0 + k];
      w[k] = a.w[c0 + k];
      b[k] = a.b[c0 + k];
    }
  }
};

// Walks a thread's rows u, u + step, ... (< end) of y and dz for the backward kernels:
// body(r, yv, dv) gets each row r's values in fp32. With kStages > 0
// (channels_last, 16-byte accesses) the rows come through the shared-memory ring
// (ring_rows, `ring`: 2 · kStages · kThreads packets), else kBwdUnroll rows' loads are
// held in registers.
template <typename T, typename TD, bool kCL, int V, int kStages, typename Body>
__device__ __forceinline__ void bwd_rows(uint4* ring, const T* y, const TD* dz, const Geo& g, const Geo& gd,
                                         const Tile& tl, int64_t c0, int64_t u, int64_t end, int64_t step,
                                         Body&& body) {
  if constexpr (kStages > 0) {
    ring_rows<kStages, 2>(
        ring, u, end, step,
        [&](int k, int64_t r) -> const void* {
          return k == 0 ? static_cast<const void*>(y + offset_of<kCL, V>(g, tl, r, c0))
                        : static_cast<const void*>(dz + offset_of<kCL, V>(gd, tl, r, c0));
        },
        [&](int64_t r, const uint4* slot) {
          float yv[V], dv[V];
          from_slot<T, V>(slot, yv);
          from_slot<TD, V>(slot + kThreads, dv);
          body(r, yv, dv);
        });
  } else {
    constexpr int kU = kBwdUnroll<V>;
    for (; u + (kU - 1) * step < end; u += kU * step) {
      Packed<T, V> ry[kU];  // raw loads in flight; converted one row at a time
      Packed<TD, V> rd[kU];
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        ry[q] = load_raw<T, V>(y + offset_of<kCL, V>(g, tl, u + q * step, c0));
        rd[q] = load_raw<TD, V>(dz + offset_of<kCL, V>(gd, tl, u + q * step, c0));
      }
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        float yv[V], dv[V];
        to_float<T, V>(ry[q], yv);
        to_float<TD, V>(rd[q], dv);
        body(u + q * step, yv, dv);
      }
    }
    for (; u < end; u += step) {
      float yv[V], dv[V];
      load<T, V>(y + offset_of<kCL, V>(g, tl, u, c0), yv);
      load<TD, V>(dz + offset_of<kCL, V>(gd, tl, u, c0), dv);
      body(u, yv, dv);
    }
  }
}

template <typename T, typename TD, bool kCL, int V, int kBuild, int kStages>
__global__ void __launch_bounds__(kThreads, 2)
bwd_partial_kernel(const T* __restrict__ y, const TD* __restrict__ dz, Geo g, Geo gd, Tile tl, Affine a, int act,
                   float slope, float* __restrict__ part) {
  constexpr int NC = kCL ? V : 1;
  __shared__ uint4 smem[std::max(2 * NC * kThreads / 4, 2 * kStages * kThreads)];  // the ring, then the tree
  float* sh = reinterpret_cast<float*>(smem);
  int64_t c0, u, step;
  slot<kCL, V>(tl, c0, u, step);
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tl.per_split;
  const int64_t end = min(start + tl.per_split, tl.units);
  u += start;
  float sg[NC], sgx[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) sg[k] = sgx[k] = 0.f;
  if (c0 < g.c) {
    BwdParams<NC> p;
    p.load(a, c0);
    bwd_rows<T, TD, kCL, V, kStages>(smem, y, dz, g, gd, tl, c0, u, end, step,
                                     [&](int64_t, const float (&yv)[V], const float (&dv)[V]) {
#pragma unroll
                                       for (int k = 0; k < V; ++k) {
                                         const int j = kCL ? k : 0;
                                         const float xhat = (yv[k] - p.mean[j]) * p.invstd[j];
                                         const float gg = dv[k] * bn_act_grad<kBuild>(xhat * p.w[j] + p.b[j], act, slope);
                                         sg[j] += gg;
                                         sgx[j] += gg * xhat;
                                       }
                                     });
  }
  if constexpr (kStages > 0) __syncthreads();  // every thread's ring reads done before the tree writes over it
  const int t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    sh[k * kThreads + t] = sg[k];
    sh[(NC + k) * kThreads + t] = sgx[k];
  }
  block_tree(kCL ? tl.lanes : 1, tl.rows, [&](int x, int w) {
#pragma unroll
    for (int k = 0; k < 2 * NC; ++k) sh[k * kThreads + x] += sh[k * kThreads + w];
  });
  const bool leader = kCL ? t < tl.lanes : t == 0;
  if (leader && c0 < g.c) {
    const int64_t splits = gridDim.x;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      part[blockIdx.x * g.c + c0 + k] = sh[k * kThreads + t];
      part[(splits + blockIdx.x) * g.c + c0 + k] = sh[(NC + k) * kThreads + t];
    }
  }
}

__global__ void __launch_bounds__(kFinThreads)
bwd_finalize_kernel(const float* __restrict__ part, int64_t c_total, int64_t splits, float* sum_g, float* sum_gx) {
  __shared__ float sh[2 * kFinThreads];
  const int t = threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinLanes + t % kFinLanes;
  float a = 0.f, b = 0.f;
  if (c < c_total) {
    for (int64_t s = t / kFinLanes; s < splits; s += kUnroll * kFinRows) {
      float pa[kUnroll], pb[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t ss = s + q * kFinRows;
        pa[q] = ss < splits ? part[ss * c_total + c] : 0.f;
        pb[q] = ss < splits ? part[(splits + ss) * c_total + c] : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        a += pa[q];
        b += pb[q];
      }
    }
  }
  sh[t] = a;
  sh[kFinThreads + t] = b;
  block_tree(kFinLanes, kFinRows, [&](int x, int w) {
    sh[x] += sh[w];
    sh[kFinThreads + x] += sh[kFinThreads + w];
  });
  if (t < kFinLanes && c < c_total) {
    sum_g[c] = sh[t];
    sum_gx[c] = sh[kFinThreads + t];
  }
}

// dy may be y itself (the recompute backward writes dy over its scratch y): each thread
// reads its elements of y before it writes them, so no __restrict__ on y and dy.
template <typename T, typename TD, bool kCL, int V, int kBuild, int kStages>
__global__ void __launch_bounds__(kThreads, 2)
dy_kernel(const T* y, const TD* __restrict__ dz, T* dy, Geo g, Geo gd, Tile tl, Affine a, int act, float slope,
          const float* __restrict__ sum_g, const float* __restrict__ sum_gx) {
  constexpr int NC = kCL ? V : 1;
  int64_t c0, u, step;
  slot<kCL, V>(tl, c0, u, step);
  if (c0 >= g.c) return;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * tl.per_split;
  const int64_t end = min(start + tl.per_split, tl.units);
  u += start;
  const float inv_m = 1.f / static_cast<float>(g.n * g.hw);
  BwdParams<NC> p;
  p.load(a, c0);
  float mg[NC], mgx[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    mg[k] = sum_g[c0 + k] * inv_m;
    mgx[k] = sum_gx[c0 + k] * inv_m;
  }
  __shared__ uint4 ring[kStages > 0 ? 2 * kStages * kThreads : 1];
  bwd_rows<T, TD, kCL, V, kStages>(ring, y, dz, g, gd, tl, c0, u, end, step,
                                   [&](int64_t r, float (&yv)[V], const float (&dv)[V]) {
#pragma unroll
                                     for (int k = 0; k < V; ++k) {
                                       const int j = kCL ? k : 0;
                                       const float xhat = (yv[k] - p.mean[j]) * p.invstd[j];
                                       const float gg = dv[k] * bn_act_grad<kBuild>(xhat * p.w[j] + p.b[j], act, slope);
                                       yv[k] = p.w[j] * p.invstd[j] * (gg - mg[j] - xhat * mgx[j]);
                                     }
                                     store<T, V>(dy + offset_of<kCL, V>(g, tl, r, c0), yv);
                                   });
}

// ---- host ---------------------------------------------------------------------------------

// Elements per 16-byte access of T where y's layout (and every other tensor's: same
// strides, 16-byte aligned) allows it, else 1.
template <typename T>
int vector_width(bool cl, const Geo& g, std::initializer_list<std::pair<const Tensor*, size_t>> others,
                 const Tensor& y) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const bool shape_ok = cl ? (g.sc == 1 && g.c % V == 0 && (g.hw == 1 || g.shw % V == 0) && (g.n == 1 || g.sn % V == 0))
                           : (g.shw == 1 && g.hw % V == 0 && g.sc % V == 0 && (g.n == 1 || g.sn % V == 0));
  if (!shape_ok || !aligned_to(y.const_data_ptr(), 16)) return 1;
  for (const auto& [t, elem] : others) {
    const Geo o = geometry(*t);
    if (o.sn != g.sn || o.sc != g.sc || o.shw != g.shw || !aligned_to(t->const_data_ptr(), elem * V)) return 1;
  }
  return V;
}

// Blocks of `Kernel` (kThreads threads) resident on one SM, asked once per kernel (the
// answer depends on the kernel's registers and shared memory, not on the call).
template <auto Kernel>
int resident_blocks() {
  static const int n = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      b = 2;
    }
    return std::max(b, 1);
  }();
  return n;
}

// The tile of a kernel over y with VEC `vec`: at most `per_sm` blocks per SM in all (one
// wave: every block resident at once, no tail wave), each thread >= kUnroll units.
Tile make_tile(bool cl, const Geo& g, int vec, int32_t device, int per_sm, int64_t& groups) {
  Tile tl{};
  if (cl) {
    const int64_t lanes_needed = (g.c + vec - 1) / vec;
    int lanes = 1;
    while (lanes < 32 && lanes < lanes_needed) lanes *= 2;
    tl.lanes = lanes;
    tl.rows = kThreads / lanes;
    tl.units = g.n * g.hw;
    tl.hwv = g.hw;
    groups = (g.c + static_cast<int64_t>(lanes) * vec - 1) / (static_cast<int64_t>(lanes) * vec);
  } else {
    tl.lanes = 1;
    tl.rows = kThreads;
    tl.hwv = g.hw / vec;
    tl.units = g.n * tl.hwv;
    groups = g.c;
  }
  const int64_t target = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sm_count(device) / groups);
  // at least kUnroll units per thread in a split
  const int64_t max_splits = std::max<int64_t>(1, tl.units / (static_cast<int64_t>(tl.rows) * kUnroll));
  int64_t splits = std::min(target, max_splits);
  tl.per_split = std::max<int64_t>(1, (tl.units + splits - 1) / splits);
  return tl;
}

int64_t splits_of(const Tile& tl) { return std::max<int64_t>(1, (tl.units + tl.per_split - 1) / tl.per_split); }

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

void check_grid(int64_t splits, int64_t groups, const char* op) {
  STD_TORCH_CHECK(groups <= 65535 && splits <= 0x7fffffffLL, "fusedops_C::", op,
                  " (CUDA): too many channels for the grid");
}

// Calls f.template operator()<kBuild>() with the kernel build for activation `act`
// (csrc/batchnorm_act.h).
template <typename F>
void with_act_build(int act, F&& f) {
  switch (bn_act_build(act)) {
    case kSilu: return f.template operator()<kSilu>();
    case kGelu: return f.template operator()<kGelu>();
    case kGeluTanh: return f.template operator()<kGeluTanh>();
    default: return f.template operator()<kPiecewise>();
  }
}

void stats_impl(Tensor& y, double eps, Tensor& mean, Tensor& invstd, Tensor& var, float* run_mean, float* run_var,
                double momentum) {
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
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    constexpr int VW = static_cast<int>(16 / sizeof(T));
    const int vec = vector_width<T>(cl, g, {}, y);
    const int per_sm = cl ? (vec > 1 ? resident_blocks<stats_partial_kernel<T, true, VW>>()
                                     : resident_blocks<stats_partial_kernel<T, true, 1>>())
                          : (vec > 1 ? resident_blocks<stats_partial_kernel<T, false, VW>>()
                                     : resident_blocks<stats_partial_kernel<T, false, 1>>());
    int64_t groups;
    const Tile tl = make_tile(cl, g, vec, dev, per_sm, groups);
    const int64_t splits = splits_of(tl);
    check_grid(splits, groups, "bn_stats");
    Tensor part = empty_f32(2 * splits, g.c, y);
    float* pp = part.mutable_data_ptr<float>();
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
    const T* yp = y.const_data_ptr<T>();
    if (cl && vec > 1) stats_partial_kernel<T, true, VW><<<grid, kThreads, 0, stream>>>(yp, g, tl, pp);
    else if (cl) stats_partial_kernel<T, true, 1><<<grid, kThreads, 0, stream>>>(yp, g, tl, pp);
    else if (vec > 1) stats_partial_kernel<T, false, VW><<<grid, kThreads, 0, stream>>>(yp, g, tl, pp);
    else stats_partial_kernel<T, false, 1><<<grid, kThreads, 0, stream>>>(yp, g, tl, pp);
    FUSEDOPS_CHECK_LAUNCH();
    stats_finalize_kernel<<<static_cast<unsigned>((g.c + kFinLanes - 1) / kFinLanes), kFinThreads, 0, stream>>>(
        pp, g.c, splits, tl.per_split, tl.units, static_cast<float>(cl ? 1 : vec), static_cast<float>(eps),
        mean.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), run_mean,
        run_var, static_cast<float>(momentum),
        static_cast<float>(static_cast<double>(m) / static_cast<double>(std::max<int64_t>(m - 1, 1))));
    FUSEDOPS_CHECK_LAUNCH();
  });
}

Affine affine_of(const Tensor& mean, const Tensor& invstd, const Tensor& w, const Tensor& b) {
  return {mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>()};
}

}  // namespace

// The entry points (csrc/batchnorm_kernels.h), registered below and called by csrc/convbn.cpp.
namespace bn_cuda {

void bn_stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var) {
  stats_impl(y, eps, mean, invstd, var, nullptr, nullptr, 0.0);
}

void bn_stats_running(Tensor y, double eps, double momentum, Tensor mean, Tensor invstd, Tensor var,
                      Tensor running_mean, Tensor running_var) {
  const int32_t dev = y.get_device_index();
  check_cuda(y, "y", dev);
  STD_TORCH_CHECK(y.dim() == 4, "fusedops_C::bn_stats_running (CUDA): y must be 4-D");
  check_channel(running_mean, y.size(1), "running_mean", dev);
  check_channel(running_var, y.size(1), "running_var", dev);
  stats_impl(y, eps, mean, invstd, var, running_mean.mutable_data_ptr<float>(), running_var.mutable_data_ptr<float>(),
             momentum);
}

void bn_act_apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,
                  Tensor z) {
  const int32_t dev = y.get_device_index();
  check_cuda(y, "y", dev);
  check_cuda(z, "z", dev);
  STD_TORCH_CHECK(y.dim() == 4 && z.dim() == 4, "fusedops_C::bn_act_apply (CUDA): y and z must be 4-D");
  const Geo g = geometry(y), gz = geometry(z);
  STD_TORCH_CHECK(g.n == gz.n && g.c == gz.c && g.hw == gz.hw && g.sn == gz.sn && g.sc == gz.sc &&
                      g.shw == gz.shw && z.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_apply (CUDA): z must have y's shape, strides and dtype");
  check_channel(mean, g.c, "mean", dev);
  check_channel(invstd, g.c, "invstd", dev);
  check_channel(weight, g.c, "weight", dev);
  check_channel(bias, g.c, "bias", dev);
  if (g.n * g.c * g.hw == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const Affine a = affine_of(mean, invstd, weight, bias);
  const bool cl = g.sc == 1 && g.c > 1;
  const int ai = static_cast<int>(act);
  const float sl = static_cast<float>(slope);
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    constexpr int VW = static_cast<int>(16 / sizeof(T));
    const int vec = vector_width<T>(cl, g, {{&z, sizeof(T)}}, y);
    const T* yp = y.const_data_ptr<T>();
    T* zp = z.mutable_data_ptr<T>();
    auto launch = [&]<bool kCL, int V, int kBuild>() {
      int64_t groups;
      const Tile tl = make_tile(cl, g, vec, dev, resident_blocks<apply_kernel<T, kCL, V, kBuild>>(), groups);
      const int64_t splits = splits_of(tl);
      check_grid(splits, groups, "bn_act_apply");
      const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
      apply_kernel<T, kCL, V, kBuild><<<grid, kThreads, 0, stream>>>(yp, zp, g, tl, a, ai, sl);
    };
    auto by_act = [&]<bool kCL, int V>() {
      with_act_build(ai, [&]<int kBuild>() { launch.template operator()<kCL, V, kBuild>(); });
    };
    if (cl && vec > 1) by_act.template operator()<true, VW>();
    else if (cl) by_act.template operator()<true, 1>();
    else if (vec > 1) by_act.template operator()<false, VW>();
    else by_act.template operator()<false, 1>();
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
  STD_TORCH_CHECK(gy.n == g.n && gy.c == g.c && gy.hw == g.hw && g.sn == gy.sn && g.sc == gy.sc &&
                      g.shw == gy.shw && dy.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_backward (CUDA): dy must have y's shape, strides and dtype");
  STD_TORCH_CHECK(gd.n == g.n && gd.c == g.c && gd.hw == g.hw, "fusedops_C::bn_act_backward (CUDA): dz shape");
  check_channel(mean, g.c, "mean", dev);
  check_channel(invstd, g.c, "invstd", dev);
  check_channel(weight, g.c, "weight", dev);
  check_channel(bias, g.c, "bias", dev);
  check_channel(sum_gx, g.c, "sum_gx", dev);
  check_channel(sum_g, g.c, "sum_g", dev);
  const int64_t m = g.n * g.hw;
  if (g.c == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const Affine a = affine_of(mean, invstd, weight, bias);
  const bool cl = g.sc == 1 && g.c > 1;
  const int ai = static_cast<int>(act);
  const float sl = static_cast<float>(slope);
  dispatch_float2(y.scalar_type(), "y", dz.scalar_type(), "dz", [&]<typename T, typename TD>() {
    constexpr int VW = static_cast<int>(16 / sizeof(T));
    int vec = 1;
    if constexpr (std::is_same_v<T, TD>) vec = vector_width<T>(cl, g, {{&dz, sizeof(TD)}, {&dy, sizeof(T)}}, y);
    const T* yp = y.const_data_ptr<T>();
    const TD* dzp = dz.const_data_ptr<TD>();
    T* dyp = dy.mutable_data_ptr<T>();
    float* sg = sum_g.mutable_data_ptr<float>();
    float* sgx = sum_gx.mutable_data_ptr<float>();
    auto launch = [&]<bool kCL, int V, int kBuild, int kS>() {
      // one tile for both passes (the partial kernel bounds the blocks per SM)
      const int per_sm = std::min(resident_blocks<bwd_partial_kernel<T, TD, kCL, V, kBuild, kS>>(),
                                  resident_blocks<dy_kernel<T, TD, kCL, V, kBuild, kS>>());
      int64_t groups;
      Tile tl = make_tile(cl, g, V, dev, per_sm, groups);
      if (m == 0) tl.per_split = 1;  // one empty split: the sums are zeros
      const int64_t splits = splits_of(tl);
      check_grid(splits, groups, "bn_act_backward");
      Tensor part = empty_f32(2 * splits, g.c, y);
      float* pp = part.mutable_data_ptr<float>();
      const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
      bwd_partial_kernel<T, TD, kCL, V, kBuild, kS><<<grid, kThreads, 0, stream>>>(yp, dzp, g, gd, tl, a, ai, sl, pp);
      FUSEDOPS_CHECK_LAUNCH();
      bwd_finalize_kernel<<<static_cast<unsigned>((g.c + kFinLanes - 1) / kFinLanes), kFinThreads, 0, stream>>>(
          pp, g.c, splits, sg, sgx);
      FUSEDOPS_CHECK_LAUNCH();
      if (m == 0) return;
      dy_kernel<T, TD, kCL, V, kBuild, kS><<<grid, kThreads, 0, stream>>>(yp, dzp, dyp, g, gd, tl, a, ai, sl, sg, sgx);
      FUSEDOPS_CHECK_LAUNCH();
    };
    auto by_act = [&]<bool kCL, int V>() {
      with_act_build(ai, [&]<int kBuild>() {
        launch.template operator()<kCL, V, kBuild, (kCL && V > 1) ? kRingStages : 0>();
      });
    };
    if constexpr (std::is_same_v<T, TD>) {
      if (vec > 1) {
        if (cl) by_act.template operator()<true, VW>();
        else by_act.template operator()<false, VW>();
        return;
      }
    }
    if (cl) by_act.template operator()<true, 1>();
    else by_act.template operator()<false, 1>();
  });
}

}  // namespace bn_cuda
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("bn_stats", TORCH_BOX(&fusedops::bn_cuda::bn_stats));
  m.impl("bn_stats_running", TORCH_BOX(&fusedops::bn_cuda::bn_stats_running));
  m.impl("bn_act_apply", TORCH_BOX(&fusedops::bn_cuda::bn_act_apply));
  m.impl("bn_act_backward", TORCH_BOX(&fusedops::bn_cuda::bn_act_backward));
}
