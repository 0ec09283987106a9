// In-place add on the CPU: x += alpha * y, math in fp32, result rounded to x's dtype.
#include "../common.h"
#include "../multi_tensor.h"
#include "vec_avx2.h"

#include <cmath>

#include <algorithm>
#include <vector>

namespace fusedops {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

// Portable path: x + alpha * y with the product rounded first (baseline x86-64 has no FMA).
template <typename TX, typename TY>
void add_run_scalar(TX* x, const TY* y, int64_t len, float alpha) {
  for (int64_t j = 0; j < len; ++j)
    x[j] = static_cast<TX>(static_cast<float>(x[j]) + alpha * static_cast<float>(y[j]));
}

#ifdef FUSEDOPS_HAVE_AVX2_PATH
// AVX2 path: 8 lanes, one FMA (the rounding eager PyTorch's vectorised add uses).
template <typename TX, typename TY>
FUSEDOPS_AVX2 void add_run_avx2(TX* x, const TY* y, int64_t len, float alpha) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    avx2::store8(x + j, _mm256_fmadd_ps(a, avx2::load8(y + j), avx2::load8(x + j)));
  for (; j < len; ++j)
    x[j] = static_cast<TX>(std::fma(alpha, static_cast<float>(y[j]), static_cast<float>(x[j])));
}
#endif

// x[i] += alpha * y[i % period] for i in [begin, end); period 0 means y is as long as x.
// x and y may be the very same memory (x += alpha * x): every lane is read before it is
// written, so the kernels take no __restrict__.
template <typename TX, typename TY>
void add_span(TX* x, const TY* y, int64_t period, int64_t begin, int64_t end, float alpha) {
  auto run = &add_run_scalar<TX, TY>;
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  if (avx2::available()) run = &add_run_avx2<TX, TY>;
#endif
  if (period == 0) {
    run(x + begin, y + begin, end - begin, alpha);
    return;
  }
  // y repeats with `period` elements: walk x row by row.
  for (int64_t i = begin; i < end;) {
    const int64_t j0 = i % period;
    const int64_t len = std::min(end - i, period - j0);
    run(x + i, y + j0, len, alpha);
    i += len;
  }
}

void add_(Tensor x, Tensor y, double alpha) {
  STD_TORCH_CHECK(x.is_cpu() && y.is_cpu(), "fusedops_C::add_ (CPU): x and y must be CPU tensors");
  STD_TORCH_CHECK(x.is_contiguous() && y.is_contiguous(),
                  "fusedops_C::add_ (CPU): x and y must be contiguous");
  const int64_t n = x.numel(), m = y.numel();
  STD_TORCH_CHECK(m == n || (m > 0 && n % m == 0),
                  "fusedops_C::add_ (CPU): y.numel() must equal or divide x.numel()");
  if (n == 0) return;
  const int64_t period = (m == n) ? 0 : m;
  const float a = static_cast<float>(alpha);
  dispatch_float2(x.scalar_type(), "x", y.scalar_type(), "y", [&]<typename TX, typename TY>() {
    TX* xp = x.mutable_data_ptr<TX>();
    const TY* yp = y.const_data_ptr<TY>();
    torch::stable::parallel_for(0, n, kGrain,
                                [&](int64_t b, int64_t e) { add_span(xp, yp, period, b, e, a); });
  });
}

// Returns false, writing nothing, when the lists are not plain (see multi_tensor.h).
bool foreach_add_(std::vector<Tensor> xs, std::vector<Tensor> ys, double alpha) {
  if (!plain_pairs(xs, ys) || !xs[0].is_cpu()) return false;
  // Every tensor is split into tasks of kGrain elements; one parallel loop runs them all.
  struct Pair {
    void* x;
    const void* y;
    int64_t n;
  };
  std::vector<Pair> pairs;
  std::vector<int64_t> first_task{0};
  for (size_t t = 0; t < xs.size(); ++t) {
    const int64_t n = xs[t].numel();
    if (n == 0) continue;
    pairs.push_back({xs[t].data_ptr(), ys[t].data_ptr(), n});
    first_task.push_back(first_task.back() + (n + kGrain - 1) / kGrain);
  }
  const int64_t tasks = first_task.back();
  if (tasks == 0) return true;
  const float a = static_cast<float>(alpha);
  dispatch_float2(xs[0].scalar_type(), "xs", ys[0].scalar_type(), "ys", [&]<typename TX, typename TY>() {
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        const size_t t = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
        const Pair& p = pairs[t];
        const int64_t b = (task - first_task[t]) * kGrain, e = std::min(p.n, b + kGrain);
        TX* xp = static_cast<TX*>(p.x);
        const TY* yp = static_cast<const TY*>(p.y);
        add_span(xp, yp, 0, b, e, a);
      }
    });
  });
  return true;
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) {
  m.impl("add_", TORCH_BOX(&fusedops::add_));
  m.impl("foreach_add_", TORCH_BOX(&fusedops::foreach_add_));
}
