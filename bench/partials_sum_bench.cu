// Microbenchmark of the CUDA C++ norm backward's dW/dB partial-row sum (P x N fp32 -> N bf16,
// two outputs), the kernel of csrc/cuda/norm_bwd.cu with its shape as template arguments:
// kCols columns a block, kGroups thread rows, the groups' sums added serially or as a tree;
// (P, N) as the backward leaves them on an H100 for 32768 rows. cudaEvent times, launch
// included, with L2 flushed before each launch (cold) and without (warm).
//
//     nvcc -O3 -arch=sm_90a -o partials_sum_bench bench/partials_sum_bench.cu && ./partials_sum_bench
#include <cstdio>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <vector>
#include <cstdlib>
#include <cmath>

struct SumParams { const float* part[2]; __nv_bfloat16* out[2]; long long p, n; };

template <int kCols, int kGroups, bool kTree>
__global__ void __launch_bounds__(kCols * kGroups) sum_kernel(const SumParams q) {
  __shared__ float ps[kGroups][kCols + 1];
  const int which = blockIdx.y;
  const float* part = q.part[which];
  const long long j = (long long)blockIdx.x * kCols + threadIdx.x;
  float acc = 0.f;
  if (j < q.n)
    for (long long i = threadIdx.y; i < q.p; i += kGroups) acc += part[i * q.n + j];
  ps[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if constexpr (kTree) {
#pragma unroll
    for (int s = kGroups / 2; s > 0; s /= 2) {
      if (threadIdx.y < s) ps[threadIdx.y][threadIdx.x] += ps[threadIdx.y + s][threadIdx.x];
      __syncthreads();
    }
    if (threadIdx.y != 0 || j >= q.n) return;
    acc = ps[0][threadIdx.x];
  } else {
    if (threadIdx.y != 0 || j >= q.n) return;
    acc = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) acc += ps[g][threadIdx.x];
  }
  q.out[which][j] = __float2bfloat16(acc);
}

__global__ void flush(float* b, long long n) { for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) b[i] += 1.f; }

template <int kCols, int kGroups, bool kTree>
void run(const char* name, SumParams q, float* fl, long long fn, const std::vector<float>& ref, __nv_bfloat16* hout) {
  dim3 grid((q.n + kCols - 1) / kCols, 2), block(kCols, kGroups);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  float cold = 0, warm = 0; const int it = 50;
  for (int r = 0; r < it + 3; ++r) {
    flush<<<528, 1024>>>(fl, fn);
    cudaEventRecord(a); sum_kernel<kCols, kGroups, kTree><<<grid, block>>>(q); cudaEventRecord(b); cudaEventSynchronize(b);
    float t; cudaEventElapsedTime(&t, a, b); if (r >= 3) cold += t;
  }
  for (int r = 0; r < it + 3; ++r) {
    cudaEventRecord(a); sum_kernel<kCols, kGroups, kTree><<<grid, block>>>(q); cudaEventRecord(b); cudaEventSynchronize(b);
    float t; cudaEventElapsedTime(&t, a, b); if (r >= 3) warm += t;
  }
  cudaMemcpy(hout, q.out[0], q.n * 2, cudaMemcpyDeviceToHost);
  double err = 0; for (long long j = 0; j < q.n; ++j) err = fmax(err, fabs(__bfloat162float(hout[j]) - ref[j]) / (fabs(ref[j]) + 1));
  printf("p=%4lld n=%5lld %-14s cold %6.2f us  warm %6.2f us  maxrel %.1e\n", q.p, q.n, name, cold / it * 1e3, warm / it * 1e3, err);
}

int main() {
  const long long cases[][2] = {{528, 512}, {528, 768}, {528, 1024}, {528, 2048}, {264, 4096}, {132, 8192}, {66, 16384}};
  long long fn = 16ll << 20; float* fl; cudaMalloc(&fl, fn * 4);
  for (auto& c : cases) {
    long long p = c[0], n = c[1];
    std::vector<float> h(p * n), ref(n, 0.f);
    srand(1); for (auto& v : h) v = rand() / (float)RAND_MAX - 0.5f;
    for (long long i = 0; i < p; ++i) for (long long j = 0; j < n; ++j) ref[j] += h[i * n + j];
    float *d0, *d1; __nv_bfloat16 *o0, *o1;
    cudaMalloc(&d0, p * n * 4); cudaMalloc(&d1, p * n * 4); cudaMalloc(&o0, n * 2); cudaMalloc(&o1, n * 2);
    cudaMemcpy(d0, h.data(), p * n * 4, cudaMemcpyHostToDevice); cudaMemcpy(d1, h.data(), p * n * 4, cudaMemcpyHostToDevice);
    SumParams q{{d0, d1}, {o0, o1}, p, n};
    std::vector<__nv_bfloat16> hout(n);
    run<32, 8, false>("32x8 serial", q, fl, fn, ref, hout.data());
    run<32, 8, true>("32x8 tree", q, fl, fn, ref, hout.data());
    run<32, 16, true>("32x16 tree", q, fl, fn, ref, hout.data());
    run<32, 32, false>("32x32 serial", q, fl, fn, ref, hout.data());
    run<32, 32, true>("32x32 tree", q, fl, fn, ref, hout.data());
    run<16, 16, true>("16x16 tree", q, fl, fn, ref, hout.data());
    run<16, 32, true>("16x32 tree", q, fl, fn, ref, hout.data());
    run<16, 64, true>("16x64 tree", q, fl, fn, ref, hout.data());
    run<8, 32, true>("8x32 tree", q, fl, fn, ref, hout.data());
    run<8, 64, true>("8x64 tree", q, fl, fn, ref, hout.data());
    cudaFree(d0); cudaFree(d1); cudaFree(o0); cudaFree(o1);
  }
  return 0;
}
