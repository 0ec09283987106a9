// Helpers shared by the CUDA C++ kernels.
#pragma once

#include "../common.h"

#include <atomic>

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#define FUSEDOPS_CUDA_CHECK(expr)                                                     \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    STD_TORCH_CHECK(err_ == cudaSuccess, "fusedops CUDA error: ", cudaGetErrorString(err_), \
                    " (", #expr, ")");                                                \
  } while (0)

// Checks the launch that was just enqueued (configuration errors, missing kernel image).
#define FUSEDOPS_CHECK_LAUNCH() FUSEDOPS_CUDA_CHECK(cudaGetLastError())

namespace fusedops {

// The current PyTorch stream of `device`: every launch goes there (streams, graphs).
inline cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// A device attribute of `device`, asked once per device (cudaDeviceGetAttribute: cheap,
// unlike cudaGetDeviceProperties); at least 1.
template <cudaDeviceAttr kAttr>
inline int device_attr(int32_t device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int hit = cache[device].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int v = 0;
  FUSEDOPS_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
  v = v > 1 ? v : 1;
  if (device >= 0 && device < 64) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Multiprocessors of `device`.
inline int sm_count(int32_t device) { return device_attr<cudaDevAttrMultiProcessorCount>(device); }

// Thread-block clusters (and distributed shared memory): compute capability 9.0 and up.
inline bool has_clusters(int32_t device) { return device_attr<cudaDevAttrComputeCapabilityMajor>(device) >= 9; }

// N elements of T packed for one 16-byte (or wider) memory access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// One packed access of N elements of T.
template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Packed<T, N>*>(p);
}

// Asynchronous 16-byte global -> shared copies (sm_80+): a thread stages its own packets of
// the rows ahead and later reads back only what it copied, so a wait on its own copy groups
// is all the synchronisation the ring needs.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
// The same for 8 bytes (both addresses 8-byte aligned; .ca: the 8-byte form has no .cg).
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__host__ __device__ inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace fusedops
