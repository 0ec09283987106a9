// How many thread-block clusters of the CUDA norm backward's shapes the GPU runs at once
// (cudaOccupancyMaxActiveClusters), against the grid the backward launches: at N = 16384
// SMs / 2 clusters of two 512-thread blocks (the kernel's shape), and two shapes measured
// and rejected (H100, 2026-12-05: clusters of four 256-thread blocks at 16384, of two at
// 8192, two blocks an SM; see bench/NOTES.md, round 13). A grid larger than what fits runs
// a second wave. A stand-in kernel with the same block size and blocks an SM (the real
// kernels use 128 registers a thread: two 256-thread or one 512-thread block an SM; the
// stand-in's shared memory is sized to allow exactly that many).
//   nvcc -arch=sm_90a -o /tmp/cluster_occupancy bench/cluster_occupancy.cu && /tmp/cluster_occupancy
#include <cstdio>
#include <cuda_runtime.h>

__global__ void __launch_bounds__(512, 1) stand_in(float* out) {
  extern __shared__ float smem[];
  smem[threadIdx.x] = threadIdx.x;
  __syncthreads();
  if (out) out[blockIdx.x * blockDim.x + threadIdx.x] = smem[(threadIdx.x + 1) % blockDim.x];
}

int main() {
  int dev = 0, sms = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncSetAttribute(stand_in, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  cudaFuncSetAttribute(stand_in, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  int smem_sm = 0;
  cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  struct Case { const char* what; int cluster, threads, per_sm, grid_clusters; };
  const Case cases[] = {
      {"N=16384 cl4 x 256 thr, 2 blocks an SM", 4, 256, 2, sms / 2},
      {"N=16384 cl2 x 512 thr, 1 block an SM", 2, 512, 1, sms / 2},
      {"N=8192  cl2 x 256 thr, 2 blocks an SM", 2, 256, 2, sms},
  };
  std::printf("SMs %d, shared memory opt-in %d bytes a block\n", sms, optin);
  for (const Case& c : cases) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(c.cluster * c.grid_clusters);
    cfg.blockDim = dim3(c.threads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem_sm / c.per_sm - 2048);
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = c.cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int active = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&active, stand_in, &cfg);
    std::printf("%-38s max active clusters %4d, grid %4d clusters%s\n", c.what,
                err == cudaSuccess ? active : -1, c.grid_clusters,
                err != cudaSuccess ? cudaGetErrorString(err) : (active < c.grid_clusters ? "  (second wave)" : ""));
  }
  return 0;
}
