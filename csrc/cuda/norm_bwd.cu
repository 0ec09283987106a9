// LayerNorm / RMSNorm + activation (+ residual add) on CUDA tensors: the backward
// (the forward: norm.cu; shared helpers: norm_common.cuh).
//
// Rows held on chip (norm_act_bwd_rows_kernel): a fixed grid of P blocks (partial_rows),
// each owning a contiguous range of rows, ty rows a step (up to N = 8192 the next steps'
// rows already in flight as asynchronous copies into a shared-memory ring); dx written
// once (rows of 8192 < N <= 16384 on sm_90+: a cluster of two blocks a row, each half the
// columns); dW/dB as one fp32 partial row per block (or cluster), summed in a fixed order by a second small
// kernel of the same op (deterministic, no atomics). Strided dy (e.g. stride 0 from .sum()), odd N, unaligned
// rows and rows longer than 16384 (bf16) take the streaming kernel: two passes per row,
// the block's partial row read-modified-written in global memory by its owner thread.
#include "norm_common.cuh"
#include "../norm_ops.h"

#include <atomic>
#include <cstdlib>
#include <string>

namespace fusedops {
namespace {

struct BwdParams {
  const void* dy; const void* xs; const void* w; const void* b; const float* mean; const float* rstd;
  const void* ds; void* dx; float* dwp; float* dbp;
  int64_t m, n, sdy0, sdy1, sxs, sds0, sds1, sdx, rows_per_block;
  int act;
  bool rms, has_w, has_b, has_ds;
  bool ds_packed;  // ds read in 16-byte packets (unit column stride, aligned rows)
  bool group_sync; // the on-chip kernel with ty > 1 row groups: each group syncs alone
  int64_t ncols;   // the cluster kernel: columns per block (block r of a cluster: [r * ncols, ...))
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

// Long rows: two passes per row (row sums, then dx); the block's dW/dB partial row lives
// in global memory, each column read-modified-written only by the thread that owns it.
template <typename T, typename W, typename Y, int V, bool kDenseDy>
__global__ void __launch_bounds__(kMaxThreads) norm_act_bwd_stream_kernel(const BwdParams p) {
  grid_dep_wait();
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

// bar.sync on barrier `id` (1-15; 0 is __syncthreads') for `threads` threads (a multiple of
// 32): memory ordering among them as __syncthreads gives the whole block.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Thread-block clusters (sm_90+; the host launches the cluster kernel only there): the
// block's rank in its cluster, the exchange of row sums through distributed shared memory
// below, and the cluster-wide barrier (release / acquire: the stores before it are seen by
// every block of the cluster after it).
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}
// The per-row exchange without a cluster barrier: each warp's row sums go into every block
// of the cluster as an asynchronous store (st.async) that completes on the receiving block's
// mbarrier (a transaction count of the expected bytes); a block waits on its own mbarrier
// only. Two buffers (and two mbarriers) by row parity; a buffer is written again two rows
// later only by a warp that has received this block's sums of the row between, i.e. after
// every warp here has read the buffer.
[[maybe_unused]] __device__ __forceinline__ unsigned smem_u32(const void* p) {  // (unused before sm_90)
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// bar[0], bar[1] with an arrival count of 1, visible to the cluster's other blocks after
// the next cluster barrier
__device__ __forceinline__ void mbar_init2(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\nmbarrier.init.shared::cta.b64 [%1], 1;\n"
               "fence.mbarrier_init.release.cluster;\n" ::"r"(smem_u32(bar)), "r"(smem_u32(bar + 1))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#else
  __trap();
#endif
}
// The wait acquires at CTA scope (the default): what it waits for are st.async stores into
// this block's own shared memory, counted by the mbarrier's transaction count, so the phase
// completes only after they have landed, and shared memory has no cache to be stale. This is
// how CUTLASS's cluster transaction barrier waits for TMA loads that another block issues,
// and how quack's cluster reductions wait for st.async; the letter of the PTX memory model
// (the complete-tx releases at cluster scope, from the other block) would ask for a
// cluster-scope acquire. That acquire also invalidates L1 at every wait: w and b, re-read
// every row, then came from L2 (H100, LN+GELU(tanh) bf16 32768 x 16384 backward: 1918 µs
// against 1604, L1 hit rate 30% against 52%, L2 hit rate 72% against 67%).
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
#else
  __trap();
#endif
}
// (v0, v1) into block `rank`'s copy of `local` (8 bytes), completing on its copy of `bar`
__device__ __forceinline__ void cluster_store2_async(float* local, uint64_t* bar, int rank, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned raddr, rbar;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(raddr) : "r"(smem_u32(local)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rbar) : "r"(smem_u32(bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\n" ::"r"(raddr),
               "f"(v0), "f"(v1), "r"(rbar)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// The backward for rows held on chip: a persistent grid (one block per dW/dB partial row,
// the caller's count), each block owning a contiguous range of rows, ty rows a step
// (blockDim = (tx, ty): tx threads per row, PK packets of V elements a thread, 16-byte
// accesses). One read of s and dy, one write of dx; xhat, z and act' recomputed from the
// fp32 mean/rstd. dW/dB accumulate in fp32 registers (a thread owns its columns), the
// rows of the next kRingStages - 1 steps in flight as asynchronous copies into a
// shared-memory ring (no registers held); or, for the longest rows (kSmemAcc), dW/dB in
// shared-memory float4 slots private to the thread (laid out lane after lane: no bank
// conflicts) and each row loaded into registers after the previous one (loading the next
// row during this one's sums and second pass spills: 32 more registers). At the end the
// ty row groups are summed in a fixed order into the block's partial row (deterministic).
// kCl = 2 (sm_90+, rows of 8192 < n <= 16384): a cluster of two blocks shares each row, a
// block p.ncols of its columns (the ring and register dW/dB of the rows of n <= 8192),
// the row sums exchanged through distributed shared memory: every warp stores its sums into
// both blocks (st.async, completing on the receiving block's mbarrier: no cluster barrier a
// row), and both blocks add the same values in the same order. H100, LN+GELU(tanh) bf16
// 32768 x 16384 backward: 1637 µs, against 2153 with a cluster barrier a row.
constexpr int kRingStages = 3;

// Bytes of one ring stage: the x half (`elems` elements of x_size bytes: a multiple of 16,
// whole packets) then the dy half (dy_size bytes an element: 8-, 16- or 32-byte packets),
// rounded up to 16 bytes so that every stage starts 16-byte aligned.
__host__ __device__ constexpr int64_t ring_stage_bytes(int64_t elems, int64_t x_size, int64_t dy_size) {
  return (elems * (x_size + dy_size) + 15) / 16 * 16;
}

template <typename T, typename W, typename Y, int V, int PK, bool kSmemAcc, int kMinBlocks, int kAct, int kCl = 1,
          int kBlockThreads = 512>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks) norm_act_bwd_rows_kernel(const BwdParams p) {
  grid_dep_wait();
  constexpr bool kRing = !kSmemAcc;  // the ring and the shared dW/dB slots exclude each other
  constexpr int kStages = kRingStages;
  static_assert(kCl == 1 || kRing, "the cluster kernel keeps dW/dB in registers");
  extern __shared__ float dyn[];   // kSmemAcc: dW, dB float4 slots [2][PK][V / 4][tx]; kRing: the
                                   // ring, then the combine buffer [ty][n]; else the combine buffer
  __shared__ __align__(8) float red[2][16 * kCl][2];  // [step parity][warp of the row's blocks][c1, c2]
  __shared__ uint64_t xbar[2];                          // kCl > 1: the mbarriers by parity
  const int tx = blockDim.x, ty = blockDim.y, tix = threadIdx.x, tiy = threadIdx.y;
  const int lane = tix & 31, warps_x = tx >> 5;
  const int rank = kCl > 1 ? cluster_rank() : 0;
  const int row_warps = warps_x * kCl;  // the warps that share a row (<= 32)
  const int wid = tiy * row_warps + rank * warps_x + (tix >> 5);
  const int64_t n = p.n;
  const int64_t nloc = kCl > 1 ? p.ncols : n;  // this block's share of a row (a ring row)
  const int64_t c0 = rank * nloc;               // its first column
  const float inv_n = 1.f / static_cast<float>(n);
  int64_t col[PK];
  bool ok[PK];
#pragma unroll
  for (int k = 0; k < PK; ++k) {
    const int64_t lc = (static_cast<int64_t>(k) * tx + tix) * V;
    col[k] = c0 + lc;
    ok[k] = lc < nloc && col[k] < n;
  }
  float dw[kSmemAcc ? 1 : PK][V], db[kSmemAcc ? 1 : PK][V];
  static_assert(!kSmemAcc || V % 4 == 0, "shared dW/dB slots hold float4s");
  float4* const acc4 = reinterpret_cast<float4*>(dyn);
  auto slot = [&](int which, int k, int q) -> float4& {  // which: 0 dW, 1 dB
    return acc4[((which * PK + k) * (V / 4) + q) * tx + tix];
  };
  if constexpr (kSmemAcc) {  // each thread zeroes (and later updates) only its own slots
#pragma unroll
    for (int k = 0; k < PK; ++k)
#pragma unroll
      for (int q = 0; q < V / 4; ++q) slot(0, k, q) = slot(1, k, q) = make_float4(0.f, 0.f, 0.f, 0.f);
  } else {
#pragma unroll
    for (int k = 0; k < PK; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) dw[k][e] = 0.f, db[k][e] = 0.f;
  }
  const int64_t part = blockIdx.x / kCl;  // the partial row (one per cluster)
  const int64_t begin = part * p.rows_per_block;
  const int64_t end = min(p.m, begin + p.rows_per_block);
  const int64_t steps = end > begin ? (end - begin + ty - 1) / ty : 0;
  if constexpr (kCl > 1) {  // every block's mbarriers initialised before any block stores into them
    if (tix == 0 && tiy == 0) mbar_init2(xbar);
    cluster_sync();
  }
  const T* xs = static_cast<const T*>(p.xs);
  const Y* dyp = static_cast<const Y*>(p.dy);
  int64_t row = begin + tiy;
  Packed<T, V> xr[PK];
  Packed<Y, V> dr[PK];
  float mean = 0.f, rstd = 0.f;
  auto load_row = [&](int64_t r, Packed<T, V> (&xo)[PK], Packed<Y, V> (&dout)[PK], float& mo, float& ro) {
#pragma unroll
    for (int k = 0; k < PK; ++k) {
      if (ok[k]) {
        xo[k] = load_raw<T, V>(xs + r * p.sxs + col[k]);
        dout[k] = load_raw<Y, V>(dyp + r * p.sdy0 + col[k]);
      }
    }
    mo = p.rms ? 0.f : p.mean[r];
    ro = p.rstd[r];
  };
  // ring slot of (stage, this thread's row group, packet k): x at [stage][tiy][col], dy after
  // the stage's x half (byte offsets: dy may be narrower or wider than x); each thread
  // touches only its own slots
  const int64_t ring_elems = static_cast<int64_t>(ty) * nloc;  // elements of one stage's x (or dy) half
  const int64_t stage_bytes = ring_stage_bytes(ring_elems, sizeof(T), sizeof(Y));
  char* const ring = reinterpret_cast<char*>(dyn);
  auto ring_x_at = [&](int64_t st, int k) {
    return reinterpret_cast<T*>(ring + st * stage_bytes) + static_cast<int64_t>(tiy) * nloc + (col[k] - c0);
  };
  auto ring_dy_at = [&](int64_t st, int k) {
    return reinterpret_cast<Y*>(ring + st * stage_bytes + ring_elems * static_cast<int64_t>(sizeof(T))) +
           static_cast<int64_t>(tiy) * nloc + (col[k] - c0);
  };
  constexpr int kDyBytes = static_cast<int>(sizeof(Y)) * V;  // a dy packet: 8, 16 or 32 bytes
  static_assert(kDyBytes == 8 || kDyBytes % 16 == 0, "dy packets of 8 or 16k bytes");
  auto issue_row = [&](int64_t st, int64_t r) {  // copies of row r into stage st (nothing past the end)
    if (r < end) {
#pragma unroll
      for (int k = 0; k < PK; ++k) {
        if (ok[k]) {
          cp_async16(ring_x_at(st, k), xs + r * p.sxs + col[k]);
          const Y* src = dyp + r * p.sdy0 + col[k];
          if constexpr (kDyBytes == 8) {  // 16-bit dy with fp32 x
            cp_async8(ring_dy_at(st, k), src);
          } else {
#pragma unroll
            for (int c = 0; c < kDyBytes / 16; ++c)  // fp32 dy with 16-bit x: two 16-byte chunks
              cp_async16(reinterpret_cast<char*>(ring_dy_at(st, k)) + 16 * c,
                         reinterpret_cast<const char*>(src) + 16 * c);
          }
        }
      }
    }
    cp_async_commit();
  };
  if constexpr (kRing) {
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) issue_row(st, row + static_cast<int64_t>(st) * ty);
    if (row < end) {
      mean = p.rms ? 0.f : p.mean[row];
      rstd = p.rstd[row];
    }
  } else if (row < end) {
    load_row(row, xr, dr, mean, rstd);
  }
  for (int64_t step = 0; step < steps; ++step) {
    const bool valid = row < end;
    const int64_t next = row + ty;
    float mean_n = 0.f, rstd_n = 0.f;
    if constexpr (kRing) {
      // refill the slot read in the previous step (its values are consumed: no hazard), then
      // wait for this step's copies
      issue_row((step + kStages - 1) % kStages, row + static_cast<int64_t>(kStages - 1) * ty);
      if (next < end) {
        mean_n = p.rms ? 0.f : p.mean[next];
        rstd_n = p.rstd[next];
      }
      cp_async_wait<kStages - 1>();
      if (valid) {
        const int64_t st = step % kStages;
#pragma unroll
        for (int k = 0; k < PK; ++k) {
          if (ok[k]) {
            xr[k] = *reinterpret_cast<const Packed<T, V>*>(ring_x_at(st, k));
            dr[k] = *reinterpret_cast<const Packed<Y, V>*>(ring_dy_at(st, k));
          }
        }
      }
    }
    float g[PK][V];  // xhat is recomputed from the raw packet after the row sums (fewer registers)
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int k = 0; k < PK; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) g[k][e] = 0.f;
      if (valid && ok[k]) {
        float wk[V], bk[V];  // re-read per row (L1 hits): no registers held across rows
#pragma unroll
        for (int e = 0; e < V; ++e) wk[e] = 1.f, bk[e] = 0.f;
        if (p.has_w) load_pack<W, V>(static_cast<const W*>(p.w) + col[k], wk);
        if (p.has_b) load_pack<W, V>(static_cast<const W*>(p.b) + col[k], bk);
        float dzs[V], dxh[V];  // dz and dz * xhat (kSmemAcc: added to the slots below)
#pragma unroll
        for (int e = 0; e < V; ++e) {  // (a missing weight / bias is 1 / 0: no branch per element)
          const float xhat = (static_cast<float>(xr[k].v[e]) - mean) * rstd;
          const float z = fmaf(xhat, wk[e], bk[e]);
          const float dz = static_cast<float>(dr[k].v[e]) * act_grad<kAct>(z);
          if constexpr (kSmemAcc) {
            dzs[e] = dz;
            dxh[e] = dz * xhat;
          } else {
            dw[k][e] += dz * xhat;
            db[k][e] += dz;
          }
          const float gv = dz * wk[e];
          g[k][e] = gv;
          c1 += gv;
          c2 += gv * xhat;
        }
        if constexpr (kSmemAcc) {
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            float4& a = slot(0, k, q);
            float4& c = slot(1, k, q);
            a.x += dxh[4 * q], a.y += dxh[4 * q + 1], a.z += dxh[4 * q + 2], a.w += dxh[4 * q + 3];
            c.x += dzs[4 * q], c.y += dzs[4 * q + 1], c.z += dzs[4 * q + 2], c.w += dzs[4 * q + 3];
          }
        }
      }
    }
    // row sums of the row group: warp shuffles, then the group's warps in a fixed order
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      c1 += __shfl_xor_sync(0xffffffffu, c1, o);
      c2 += __shfl_xor_sync(0xffffffffu, c2, o);
    }
    const int par = static_cast<int>(step & 1);
    if constexpr (kCl > 1) {
      if (tix == 0) mbar_arrive_expect_tx(&xbar[par], static_cast<unsigned>(row_warps) * 8u);
      if (lane == 0)
#pragma unroll
        for (int r = 0; r < kCl; ++r) cluster_store2_async(&red[par][wid][0], &xbar[par], r, c1, c2);
      mbar_wait_parity(&xbar[par], static_cast<unsigned>((step >> 1) & 1));
    } else {
      if (lane == 0) {
        red[par][wid][0] = c1;
        red[par][wid][1] = c2;
      }
      // red[par] is next written two steps later, after another barrier. Only the row
      // group's own warps read its sums: with several row groups a step, each group waits
      // for its own warps alone (a named barrier; a group of one warp: __syncwarp)
      if (ty == 1 || !p.group_sync) __syncthreads();
      else if (tx == 32) __syncwarp();
      else named_barrier(1 + tiy, tx);
    }
    // the row's warp sums: lane i takes warp i's, then a butterfly (every lane, and each
    // block of a cluster, gets the same bits; 2 loads and 10 shuffles instead of a loop)
    float s1 = lane < row_warps ? red[par][tiy * row_warps + lane][0] : 0.f;
    float s2 = lane < row_warps ? red[par][tiy * row_warps + lane][1] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
      s2 += __shfl_xor_sync(0xffffffffu, s2, o);
    }
    const float m1 = p.rms ? 0.f : s1 * inv_n;
    const float m2 = s2 * inv_n;
    if (valid) {
#pragma unroll
      for (int k = 0; k < PK; ++k) {
        if (!ok[k]) continue;
        float dx[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xhat = (static_cast<float>(xr[k].v[e]) - mean) * rstd;
          dx[e] = (g[k][e] - m1 - xhat * m2) * rstd;
        }
        if (p.has_ds) {
          const T* d = static_cast<const T*>(p.ds) + row * p.sds0;
          if (p.ds_packed) {
            float dsv[V];
            load_pack<T, V>(d + col[k], dsv);
#pragma unroll
            for (int e = 0; e < V; ++e) dx[e] += dsv[e];
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) dx[e] += static_cast<float>(d[(col[k] + e) * p.sds1]);
          }
        }
        store_pack<T, V, (kCl > 1)>(static_cast<T*>(p.dx) + row * p.sdx + col[k], dx);
      }
    }
    if constexpr (kRing) {
      mean = mean_n;
      rstd = rstd_n;
    } else if (next < end) {
      load_row(next, xr, dr, mean, rstd);
    }
    row = next;
  }
  if constexpr (kCl > 1) cluster_sync();  // no block leaves while stores into it may be in flight
  // the block's partial rows
  float* dwp = p.has_w ? p.dwp + part * n : nullptr;
  float* dbp = p.has_b ? p.dbp + part * n : nullptr;
  if constexpr (kSmemAcc) {
#pragma unroll
    for (int k = 0; k < PK; ++k) {
      if (!ok[k]) continue;
      for (int which = 0; which < 2; ++which) {
        float* out = which == 0 ? dwp : dbp;
        if (out == nullptr) continue;
        float v[V];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 a = slot(which, k, q);
          v[4 * q] = a.x, v[4 * q + 1] = a.y, v[4 * q + 2] = a.z, v[4 * q + 3] = a.w;
        }
        store_pack<float, V>(out + col[k], v);
      }
    }
  } else if (ty == 1) {
#pragma unroll
    for (int k = 0; k < PK; ++k) {
      if (!ok[k]) continue;
      if (dwp) store_pack<float, V>(dwp + col[k], dw[k]);
      if (dbp) store_pack<float, V>(dbp + col[k], db[k]);
    }
  } else {
    if constexpr (kRing) {
      cp_async_wait<0>();  // (only empty groups are left) the ring becomes the combine buffer
      __syncthreads();
    }
    for (int which = 0; which < 2; ++which) {
      float* out = which == 0 ? dwp : dbp;
      if (out == nullptr) continue;  // uniform over the block
#pragma unroll
      for (int k = 0; k < PK; ++k)
        if (ok[k])
#pragma unroll
          for (int e = 0; e < V; ++e) dyn[tiy * n + col[k] + e] = which == 0 ? dw[k][e] : db[k][e];
      __syncthreads();
      if (tiy == 0) {
#pragma unroll
        for (int k = 0; k < PK; ++k) {
          if (!ok[k]) continue;
          float acc[V];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = 0.f;
          for (int j = 0; j < ty; ++j)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += dyn[j * n + col[k] + e];
          store_pack<float, V>(out + col[k], acc);
        }
      }
      __syncthreads();
    }
  }
}

// Block shape of the on-chip backward for rows of n elements in packets of V, at most 512
// threads: 8 elements a thread over ty = 512 / tx rows a step (n < 512, 2 blocks an SM); 16
// a thread in blocks of at most 128 threads over 128 / tx rows a step (512 <= n <= 2048, 4
// blocks an SM: small_rows); 16 a thread, one row a step (n <= 8192; 2 blocks an SM up to n = 4096, else
// 1: fewer instructions a row than 8 a thread from n = 4096); n <= 16384: on sm_90+ a
// cluster of two such blocks a row (H200, LN+GELU(tanh) bf16 32768 x 16384 fwd+bwd: 2476 vs
// 2716 µs with the shared-memory accumulators), before sm_90 32 a thread with shared-memory
// dW/dB accumulators; false: the streaming kernel. Mirrored by partial_rows below (the
// number of blocks = partial rows). All but the last stream their rows through the
// shared-memory ring of asynchronous copies.
// FUSEDOPS_NORM_CUDA_BWD (read once) picks a path for experiments: "stream" forces the
// streaming kernel; "blocksync" one block-wide barrier a step where a block holds several
// row groups (n <= 2048; default: each group's own named barrier: H100, LN+GELU(tanh) bf16
// 32768 x 1024 backward 94.4 vs 98.6 µs); "pk8" / "pk16" 8 / 16 elements a thread for the
// rows of n <= 4096 (default: 16 for n > 2048; H100, LN+GELU(tanh) bf16: 309 vs 335 µs at
// 4096, 188 vs 178 at 2048; either also turns small_rows off); "small" the small_rows shape
// for the rows of any n <= 2048; "sum8" 8 thread rows in the partial-row sum at every n.
const std::string& bwd_mode() {
  static const std::string mode = [] {
    const char* v = std::getenv("FUSEDOPS_NORM_CUDA_BWD");
    return std::string(v != nullptr ? v : "");
  }();
  return mode;
}
bool force_stream() { return bwd_mode() == "stream"; }
// Rows of 512 <= n <= 2048 in blocks of at most 128 threads, 128 / tx rows a step (tx = 96 for
// 1024 < n <= 1536: one row of 3 warps), 16 elements a thread, 4 blocks an SM (Triton's shape
// at 1024; the count assumes 4 fit, as on sm_90's 228 KB: at most 48 KB a block). H100,
// LN+GELU(tanh) bf16 32768 rows, kernel sums of fwd+bwd against the 512-thread blocks of 8 a
// thread: 76.9 / 79.3 µs at 512, 113.1 / 113.2 at 768, 141.6 / 148.7 at 1024, 263.3 / 275.7 at
// 2048; at 256 48.9 / 46.8 (not taken). FUSEDOPS_NORM_CUDA_BWD=small takes it for any n <=
// 2048, "pk8" / "pk16" never.
bool small_rows(int64_t n) {
  const std::string& mode = bwd_mode();
  return n <= 2048 && (mode == "small" || (n >= 512 && mode != "pk8" && mode != "pk16"));
}

// Lets `kernel` use all the dynamic shared memory a block may opt in to (the device's
// opt-in limit less the kernel's static shared memory), once per device and kernel.
template <auto kernel>
void allow_max_smem() {
  static std::atomic<uint64_t> done{0};  // one per kernel: a template argument
  int dev = 0;
  FUSEDOPS_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return;
  int optin = 0;
  FUSEDOPS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr{};
  FUSEDOPS_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  FUSEDOPS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           optin - static_cast<int>(attr.sharedSizeBytes)));
  done.fetch_or(bit, std::memory_order_relaxed);
}

int round_warp(int64_t t) { return static_cast<int>((t + 31) / 32 * 32); }

template <typename T, typename W, typename Y, int V, int PK, int kMinBlocks, int kAct, int kBlockThreads = 512>
void launch_rows_plain(const BwdParams& p, int blocks, int tx, int ty, cudaStream_t stream, bool pdl) {
  const size_t combine = ty > 1 ? static_cast<size_t>(ty) * p.n * sizeof(float) : 0;
  const size_t ring =
      kRingStages * static_cast<size_t>(ring_stage_bytes(static_cast<int64_t>(ty) * p.n, sizeof(T), sizeof(Y)));
  const size_t smem = std::max(ring, combine);
  constexpr auto kernel = norm_act_bwd_rows_kernel<T, W, Y, V, PK, false, kMinBlocks, kAct, 1, kBlockThreads>;
  allow_max_smem<kernel>();
  launch_norm(kernel, dim3(blocks), dim3(tx, ty), smem, stream, pdl, 1, p);
}

// Rows of 8192 < n <= 16384 on sm_90+: `parts` clusters of two blocks, each block half the
// columns (rounded up to a packet) at 16 elements a thread.
template <typename T, typename W, typename Y, int V, int PK, int kAct>
void launch_rows_cluster(const BwdParams& p, int parts, cudaStream_t stream, bool pdl) {
  BwdParams q = p;
  q.ncols = (p.n + 2 * V - 1) / (2 * V) * V;
  const int tx = round_warp((q.ncols + V * PK - 1) / (V * PK));
  const size_t smem = kRingStages * static_cast<size_t>(ring_stage_bytes(q.ncols, sizeof(T), sizeof(Y)));
  constexpr auto kernel = norm_act_bwd_rows_kernel<T, W, Y, V, PK, false, 1, kAct, 2>;
  allow_max_smem<kernel>();
  launch_norm(kernel, dim3(2 * static_cast<unsigned>(parts)), dim3(tx, 1), smem, stream, pdl, 2, q);
}

template <typename T, typename W, typename Y, int V, int kAct>
bool launch_bwd_rows(const BwdParams& p, int blocks, int device, cudaStream_t stream) {
  constexpr int PK8 = V >= 8 ? 1 : 8 / V;
  const auto threads = [&](int pk) { return round_warp((p.n + V * pk - 1) / (V * pk)); };
  const bool pk16 = threads(2 * PK8) <= 256 && bwd_mode() != "pk8" && (p.n > 2048 || bwd_mode() == "pk16");
  const bool pdl = norm_pdl(device);
  if (small_rows(p.n)) {
    const int tx = threads(2 * PK8);
    launch_rows_plain<T, W, Y, V, 2 * PK8, 4, kAct, 128>(p, blocks, tx, 128 / tx, stream, pdl);
  } else if (threads(PK8) <= 512 && !pk16) {
    const int tx = threads(PK8);
    launch_rows_plain<T, W, Y, V, PK8, 2, kAct>(p, blocks, tx, 512 / tx, stream, pdl);
  } else if (threads(2 * PK8) <= 512) {
    launch_rows_plain<T, W, Y, V, 2 * PK8, 1, kAct>(p, blocks, threads(2 * PK8), 1, stream, pdl);
  } else if (threads(4 * PK8) <= 512 && has_clusters(device)) {
    launch_rows_cluster<T, W, Y, V, 2 * PK8, kAct>(p, blocks, stream, pdl);
  } else if (threads(4 * PK8) <= 512) {  // before sm_90: dW/dB in shared memory
    const size_t smem = 2 * static_cast<size_t>(4 * PK8) * V * threads(4 * PK8) * sizeof(float);
    auto kernel = norm_act_bwd_rows_kernel<T, W, Y, V, 4 * PK8, true, 1, kAct>;
    FUSEDOPS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    launch_norm(kernel, dim3(blocks), dim3(threads(4 * PK8), 1), smem, stream, pdl, 1, p);
  } else {
    return false;
  }
  return true;
}

// The activation as a template argument (its derivative inlined alone: fewer registers).
template <typename T, typename W, typename Y, int V>
bool launch_bwd_rows_act(const BwdParams& p, int blocks, int device, cudaStream_t stream) {
  switch (p.act) {
    case 0: return launch_bwd_rows<T, W, Y, V, 0>(p, blocks, device, stream);
    case 1: return launch_bwd_rows<T, W, Y, V, 1>(p, blocks, device, stream);
    case 2: return launch_bwd_rows<T, W, Y, V, 2>(p, blocks, device, stream);
    case 3: return launch_bwd_rows<T, W, Y, V, 3>(p, blocks, device, stream);
    default: return launch_bwd_rows<T, W, Y, V, 4>(p, blocks, device, stream);
  }
}

void norm_act_bwd(Tensor dy, Tensor xs, Tensor w, Tensor b, Tensor mean, Tensor rstd, Tensor ds, Tensor dx,
                  Tensor dwp, Tensor dbp, int64_t act, bool rms, bool has_w, bool has_b, bool has_ds) {
  STD_TORCH_CHECK(xs.is_cuda() && dy.is_cuda() && dx.is_cuda(),
                  "fusedops_C::norm_act_bwd (CUDA): tensors must be CUDA tensors");
  STD_TORCH_CHECK(xs.dim() == 2 && dx.dim() == 2 && dy.dim() == 2 && norm::unit_columns(xs) &&
                      norm::unit_columns(dx),
                  "fusedops_C::norm_act_bwd (CUDA): xs, dx must be 2-D with unit column stride, dy 2-D");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_bwd (CUDA): weight and bias must share a dtype");
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
              (m + blocks - 1) / blocks, static_cast<int>(act), rms, has_w, has_b, has_ds, false};
  torch::stable::accelerator::DeviceGuard guard(xs.get_device_index());
  cudaStream_t stream = current_stream(xs.get_device_index());
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : xs.scalar_type());
  dispatch_norm(xs.scalar_type(), wt, dy.scalar_type(), [&]<typename T, typename W, typename Y>() {
    constexpr int V = 16 / sizeof(T);
    const bool packed = can_pack<V>(n, {{p.xs, p.sxs}, {p.dx, p.sdx}}, sizeof(T)) &&
                        can_pack<V>(n, {{p.w, 0}, {p.b, 0}}, sizeof(W)) &&
                        can_pack<V>(n, {{p.dwp, 0}, {p.dbp, 0}}, sizeof(float)) && p.sdy1 == 1 &&
                        can_pack<V>(n, {{p.dy, p.sdy0}}, sizeof(Y));
    BwdParams q = p;
    q.ds_packed = p.has_ds && p.sds1 == 1 && can_pack<V>(n, {{p.ds, p.sds0}}, sizeof(T));
    q.group_sync = bwd_mode() != "blocksync";
    // strided dy (e.g. stride 0 from .sum()), odd N, unaligned rows or N > 16384: streaming
    // (FUSEDOPS_NORM_CUDA_BWD=stream forces it, to compare the two paths)
    if (!(packed && !force_stream() && launch_bwd_rows_act<T, W, Y, V>(q, static_cast<int>(blocks), xs.get_device_index(), stream))) {
      launch_norm(norm_act_bwd_stream_kernel<T, W, Y, 1, false>, dim3(static_cast<unsigned>(blocks)),
                  dim3(kMaxThreads), 0, stream, norm_pdl(xs.get_device_index()), 1, p);
    }
  });
}

}  // namespace
}  // namespace fusedops

// The op: outputs allocated here, any leading shape (csrc/norm_ops.h); dW / dB summed from
// the partial rows and cast by a second small kernel.
namespace fusedops {
namespace {

// Whether the rows of s and dy meet the on-chip backward's packing rules on the two inputs
// (16-byte packets: N a multiple of the packet, aligned rows, dy unit-strided along N), as
// launch_bwd_rows_act's caller checks them; where they fail the streaming kernel runs (one
// block a partial row) and must not get the cluster path's one partial row per two SMs.
bool rows_packable(int64_t n, const Tensor& s, const Tensor& dy) {
  const auto row_stride = [](const Tensor& t) { return t.dim() < 2 ? int64_t{0} : t.stride(t.dim() - 2); };
  const auto packs = [&]<int V>() {
    return can_pack<V>(n, {{s.data_ptr(), row_stride(s)}}, s.element_size()) &&
           can_pack<V>(n, {{dy.data_ptr(), row_stride(dy)}}, dy.element_size());
  };
  const bool unit_dy = dy.stride(dy.dim() - 1) == 1 || n == 1;
  return !force_stream() && unit_dy && (s.element_size() == 4 ? packs.template operator()<4>()
                                                               : packs.template operator()<8>());
}

// dW / dB partial rows = blocks of the backward: one (dW / dB written directly) for small
// inputs (launch-bound); else as many as are resident at once (launch_bwd_rows: rows of
// 512 <= n <= 2048 in blocks of at most 128 threads over 128 / tx rows a step, 4 blocks an
// SM; other rows of n <= 4096 in 512-thread blocks over 512 / tx rows a step, 2 blocks an SM;
// longer rows 1 block an SM; rows of 8192 < n <= 16384 on sm_90+ a cluster of two blocks a
// row).
int64_t partial_rows(int64_t m, int64_t n, const Tensor& s, const Tensor& dy) {
  if (m * n <= (int64_t{1} << 17)) return 1;
  const int32_t device = s.get_device_index();
  const int64_t sms = sm_count(device);
  const int64_t tx = ((n + 7) / 8 + 31) / 32 * 32;
  if (small_rows(n)) {
    const int64_t per_step = 128 / (((n + 15) / 16 + 31) / 32 * 32);
    return std::max<int64_t>(1, std::min<int64_t>((m + per_step - 1) / per_step, 4 * sms));
  }
  if (tx <= 512) {
    const int64_t per_step = 512 / tx;
    return std::max<int64_t>(1, std::min<int64_t>((m + per_step - 1) / per_step, 2 * sms));
  }
  const bool cluster = n > 8192 && n <= 16384 && has_clusters(device) && rows_packable(n, s, dy);
  return std::max<int64_t>(1, std::min<int64_t>(m, cluster ? sms / 2 : sms));
}

struct SumParams {
  const float* part[2];
  void* out[2];
  int dtype[2];  // 0 float32, 1 float16, 2 bfloat16
  int64_t p, n;
};

int dtype_code(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 0;
    case ScalarType::Half: return 1;
    case ScalarType::BFloat16: return 2;
    default: STD_TORCH_CHECK(false, "fusedops_C norm (CUDA): parameters must be float32, float16 or bfloat16");
  }
  return 0;
}

// out[j] = sum over i of part[i, j] in fp32, cast to the output dtype; blockIdx.y the output
// (dW, dB). A block (32, kGroups) owns 32 columns: thread row g sums the partial rows
// g, g + kGroups, ... in order, then thread row 0 adds the groups' sums in order.
// Deterministic: no atomics, a fixed order per column. kGroups (sum_partials) by n: 32 for
// n <= 1024, 16 up to 2048, else 8: more threads where there are few column blocks, fewer
// where the last add's serial terms and the big blocks cost more than they gain. H100,
// LN+GELU(tanh) bf16 32768 rows, the kernel in the fwd+bwd (528 partial rows): 4.1 µs against
// 5.1 with 8 groups at 1024, 6.5 against 8.2 at 2048; a microbenchmark (L2 flushed, launch
// included) had 32 groups at 13.0 against 9.8 µs at 4096 and 22.7 against 12.9 at 16384.
template <int kGroups>
__global__ void __launch_bounds__(32 * kGroups) norm_partials_sum_kernel(const SumParams q) {
  grid_dep_wait();
  __shared__ float part_sum[kGroups][33];
  const int which = blockIdx.y;
  const float* part = which ? q.part[1] : q.part[0];  // (no dynamic index: q stays in parameter space)
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (j < q.n)
    for (int64_t i = threadIdx.y; i < q.p; i += kGroups) acc += part[i * q.n + j];
  part_sum[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || j >= q.n) return;
  acc = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) acc += part_sum[g][threadIdx.x];
  void* out = which ? q.out[1] : q.out[0];
  switch (which ? q.dtype[1] : q.dtype[0]) {
    case 0: static_cast<float*>(out)[j] = acc; break;
    case 1: static_cast<c10::Half*>(out)[j] = static_cast<c10::Half>(acc); break;
    default: static_cast<c10::BFloat16*>(out)[j] = static_cast<c10::BFloat16>(acc); break;
  }
}

void sum_partials(const Tensor& dwp, Tensor& dw, bool sum_w, const Tensor& dbp, Tensor& db, bool sum_b, int64_t p,
                  int64_t n) {
  SumParams q{};
  int k = 0;
  const auto add = [&](const Tensor& part, const Tensor& out) {
    q.part[k] = static_cast<const float*>(part.data_ptr());
    q.out[k] = out.data_ptr();
    q.dtype[k++] = dtype_code(out.scalar_type());
  };
  if (sum_w) add(dwp, dw);
  if (sum_b) add(dbp, db);
  q.p = p;
  q.n = n;
  const int device = (sum_w ? dw : db).get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  STD_TORCH_CHECK((n + 31) / 32 < (int64_t{1} << 31), "fusedops_C::norm_act_bwd (CUDA): hidden size too large");
  const dim3 grid(static_cast<unsigned>((n + 31) / 32), k);
  cudaStream_t stream = current_stream(device);
  const int groups = bwd_mode() == "sum8" ? 8 : (n <= 1024 ? 32 : (n <= 2048 ? 16 : 8));
  const bool pdl = norm_pdl(device);
  if (groups == 32) launch_norm(norm_partials_sum_kernel<32>, grid, dim3(32, 32), 0, stream, pdl, 1, q);
  else if (groups == 16) launch_norm(norm_partials_sum_kernel<16>, grid, dim3(32, 16), 0, stream, pdl, 1, q);
  else launch_norm(norm_partials_sum_kernel<8>, grid, dim3(32, 8), 0, stream, pdl, 1, q);
}

std::tuple<Tensor, Tensor, Tensor> norm_act_backward(Tensor dy, Tensor s, std::optional<Tensor> w,
                                                     std::optional<Tensor> b, std::optional<Tensor> mean, Tensor rstd,
                                                     std::optional<Tensor> ds, int64_t act) {
  STD_TORCH_CHECK(s.is_cuda(), "fusedops_C::norm_act_bwd (CUDA): s must be a CUDA tensor");
  return norm::backward(partial_rows, norm_act_bwd, sum_partials, dy, s, w, b, mean, rstd, ds, act);
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CUDA, m) {
  m.impl("norm_act_bwd", TORCH_BOX(&fusedops::norm_act_backward));
}
