// LayerNorm / RMSNorm + activation (+ residual add) on the CPU, forward and backward.
// Rows in parallel; statistics in double, math in fp32; dW/dB from fp32 partials of fixed
// row chunks (independent of the thread count), summed by the caller in chunk order.
// On x86-64 CPUs with AVX2 + FMA + F16C, rows with unit column strides run 8 lanes at a
// time (vec_avx2.h: exp, erf, loads and stores of fp16 / bf16), the activation chosen at
// compile time; the scalar loops are the portable path and take every other case.
#include "../common.h"
#include "../norm_ops.h"
#include "vec_avx2.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fusedops {
namespace {

inline float act_fwd(float z, int64_t act) {
  switch (act) {
    case 1: return z > 0.f || z != z ? z : 0.f;  // (NaN stays NaN, as eager's relu)
    case 2: return 0.5f * z * (1.f + std::erf(z * 0.70710678118654752f));
    case 3: return 0.5f * z * (1.f + std::tanh(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case 4: return z / (1.f + std::exp(-z));
    default: return z;
  }
}

inline float act_grad(float z, int64_t act) {
  switch (act) {
    case 1: return z > 0.f ? 1.f : 0.f;
    case 2:
      return 0.5f * (1.f + std::erf(z * 0.70710678118654752f)) + z * std::exp(-0.5f * z * z) * 0.39894228040143268f;
    case 3: {
      const float t = std::tanh(0.79788456080286536f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.79788456080286536f * (1.f + 0.134145f * z * z);
    }
    case 4: {
      const float sg = 1.f / (1.f + std::exp(-z));
      return sg * (1.f + z * (1.f - sg));
    }
    default: return 1.f;
  }
}

struct FwdArgs {
  const void* x; const void* r; void* s; void* y; const void* w; const void* b; float* mean; float* rstd;
  int64_t m, n, sx, sr, ss, sy;
  float eps;
  int64_t act;
  bool rms, has_r, has_w, has_b;
};

template <typename T, typename W, typename Y>
void fwd_rows(const FwdArgs& a, int64_t begin, int64_t end) {
  std::vector<float> row(a.n);
  const W* w = static_cast<const W*>(a.w);
  const W* b = static_cast<const W*>(a.b);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * a.sx;
    double sum = 0.0;
    if (a.has_r) {
      const T* rr = static_cast<const T*>(a.r) + i * a.sr;
      T* sr = static_cast<T*>(a.s) + i * a.ss;
      for (int64_t j = 0; j < a.n; ++j) {
        const T sv = static_cast<T>(static_cast<float>(xr[j]) + static_cast<float>(rr[j]));
        sr[j] = sv;
        row[j] = static_cast<float>(sv);
        sum += row[j];
      }
    } else {
      for (int64_t j = 0; j < a.n; ++j) {
        row[j] = static_cast<float>(xr[j]);
        sum += row[j];
      }
    }
    double mean = 0.0, sq = 0.0;
    if (!a.rms) {
      mean = sum / static_cast<double>(a.n);
      a.mean[i] = static_cast<float>(mean);
    }
    for (int64_t j = 0; j < a.n; ++j) {
      const double d = row[j] - mean;
      sq += d * d;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(a.n) + a.eps));
    a.rstd[i] = rstd;
    const float meanf = static_cast<float>(mean);
    Y* yr = static_cast<Y*>(a.y) + i * a.sy;
    for (int64_t j = 0; j < a.n; ++j) {
      float z = (row[j] - meanf) * rstd;
      if (a.has_w) z *= static_cast<float>(w[j]);
      if (a.has_b) z += static_cast<float>(b[j]);
      yr[j] = static_cast<Y>(act_fwd(z, a.act));
    }
  }
}

#ifdef FUSEDOPS_HAVE_AVX2_PATH
// ---- AVX2 path ---------------------------------------------------------------------------
// lo, hi += v (squares: v²) in double.
FUSEDOPS_AVX2 inline void sum8(__m256d& lo, __m256d& hi, __m256 v, bool squares) {
  if (squares) avx2::fma_pd(lo, hi, v, v);
  else avx2::add_pd(lo, hi, v);
}

// s = x + r stored as T, and returned as stored (rounded to T).
template <typename T>
FUSEDOPS_AVX2 inline __m256 add_store8(T* s, const T* x, const T* r) {
  avx2::store8(s, _mm256_add_ps(avx2::load8(x), avx2::load8(r)));
  return avx2::load8(s);
}

// Activation codes as act_fwd: 0 identity, 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 silu.
template <int A>
FUSEDOPS_AVX2 inline __m256 act8(__m256 z) {
  if constexpr (A == 1) return avx2::relu8(z);
  else if constexpr (A == 2) return avx2::gelu8(z);
  else if constexpr (A == 3) return avx2::gelu_tanh8(z);
  else if constexpr (A == 4) return avx2::silu8(z);
  else return z;
}

template <int A>
FUSEDOPS_AVX2 inline __m256 act_grad8(__m256 z) {
  if constexpr (A == 1) return avx2::relu_grad8(z);
  else if constexpr (A == 2) return avx2::gelu_grad8(z);
  else if constexpr (A == 3) return avx2::gelu_tanh_grad8(z);
  else if constexpr (A == 4) return avx2::silu_grad8(z);
  else return _mm256_set1_ps(1.f);
}

// weight / bias as fp32 [n]: the parameter's own data when it is fp32, else a converted copy
// in `store` (ones / zeros when absent: z·1 + 0 is z exactly).
const float* as_f32(const void* p, ScalarType t, int64_t n, float fill, std::vector<float>& store) {
  if (p != nullptr && t == ScalarType::Float) return static_cast<const float*>(p);
  store.assign(n, fill);
  if (p != nullptr) {
    dispatch_float(t, "weight", [&]<typename W>() {
      const W* w = static_cast<const W*>(p);
      for (int64_t j = 0; j < n; ++j) store[j] = static_cast<float>(w[j]);
    });
  }
  return store.data();
}

template <typename T, typename Y, int A>
FUSEDOPS_AVX2 void fwd_rows_avx2(const FwdArgs& a, const float* w, const float* b, int64_t begin, int64_t end) {
  // Each pass reads the row from its source (x, or s as stored after the residual add; a
  // row stays in cache between passes). RMSNorm sums the squares in the first pass;
  // LayerNorm sums there and takes the squares about the mean in a second.
  // The sums run on four double chains (two 8-lane loads a step): with two, the adds'
  // latency, not the loads, set the pace of these light passes.
  const int64_t n = a.n, n8 = n & ~int64_t{7}, n16 = n & ~int64_t{15};
  for (int64_t i = begin; i < end; ++i) {
    const T* src = static_cast<const T*>(a.x) + i * a.sx;
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
    double acc = 0.0;
    int64_t j = 0;
    if (a.has_r) {
      const T* rr = static_cast<const T*>(a.r) + i * a.sr;
      T* sr = static_cast<T*>(a.s) + i * a.ss;
      for (; j < n16; j += 16) {
        sum8(s0, s1, add_store8(sr + j, src + j, rr + j), a.rms);
        sum8(s2, s3, add_store8(sr + j + 8, src + j + 8, rr + j + 8), a.rms);
      }
      if (j < n8) {
        sum8(s0, s1, add_store8(sr + j, src + j, rr + j), a.rms);
        j += 8;
      }
      for (; j < n; ++j) {
        sr[j] = static_cast<T>(static_cast<float>(src[j]) + static_cast<float>(rr[j]));
        const double v = static_cast<float>(sr[j]);
        acc += a.rms ? v * v : v;
      }
      src = sr;
    } else {
      for (; j < n16; j += 16) {
        sum8(s0, s1, avx2::load8(src + j), a.rms);
        sum8(s2, s3, avx2::load8(src + j + 8), a.rms);
      }
      if (j < n8) {
        sum8(s0, s1, avx2::load8(src + j), a.rms);
        j += 8;
      }
      for (; j < n; ++j) {
        const double v = static_cast<float>(src[j]);
        acc += a.rms ? v * v : v;
      }
    }
    acc += avx2::hsum_pd(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    double mean = 0.0, sq = acc;
    if (!a.rms) {
      mean = acc / static_cast<double>(n);
      a.mean[i] = static_cast<float>(mean);
      const __m256d mv = _mm256_set1_pd(mean);
      s0 = s1 = s2 = s3 = _mm256_setzero_pd();
      sq = 0.0;
      for (j = 0; j < n16; j += 16) {
        avx2::sq_dev_pd(s0, s1, avx2::load8(src + j), mv, mv);
        avx2::sq_dev_pd(s2, s3, avx2::load8(src + j + 8), mv, mv);
      }
      if (j < n8) {
        avx2::sq_dev_pd(s0, s1, avx2::load8(src + j), mv, mv);
        j += 8;
      }
      for (; j < n; ++j) {
        const double d = static_cast<float>(src[j]) - mean;
        sq += d * d;
      }
      sq += avx2::hsum_pd(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + a.eps));
    a.rstd[i] = rstd;
    const float meanf = static_cast<float>(mean);
    const __m256 mf = _mm256_set1_ps(meanf), rs = _mm256_set1_ps(rstd);
    Y* yr = static_cast<Y*>(a.y) + i * a.sy;
    for (j = 0; j < n8; j += 8) {
      const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(avx2::load8(src + j), mf), rs);
      const __m256 z = _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + j), _mm256_loadu_ps(b + j));
      avx2::store8(yr + j, act8<A>(z));
    }
    for (; j < n; ++j)
      yr[j] = static_cast<Y>(act_fwd(std::fma((static_cast<float>(src[j]) - meanf) * rstd, w[j], b[j]), A));
  }
}
#endif

void norm_act_fwd(Tensor x, Tensor r, Tensor s, Tensor y, Tensor w, Tensor b, Tensor mean, Tensor rstd, double eps,
                  int64_t act, bool rms, bool has_r, bool has_w, bool has_b) {
  STD_TORCH_CHECK(x.is_cpu() && y.is_cpu(), "fusedops_C::norm_act_fwd (CPU): tensors must be on the CPU");
  STD_TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && norm::unit_columns(x) && norm::unit_columns(y),
                  "fusedops_C::norm_act_fwd (CPU): x and y must be 2-D with unit column stride");
  STD_TORCH_CHECK(!has_r || (norm::unit_columns(r) && norm::unit_columns(s)),
                  "fusedops_C::norm_act_fwd (CPU): r and s must have unit column stride");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_fwd (CPU): weight and bias must share a dtype");
  FwdArgs a{x.data_ptr(), has_r ? r.data_ptr() : nullptr, has_r ? s.data_ptr() : nullptr, y.data_ptr(),
            has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
            rms ? nullptr : static_cast<float*>(mean.data_ptr()), static_cast<float*>(rstd.data_ptr()),
            x.size(0), x.size(1), x.stride(0), has_r ? r.stride(0) : 0, has_r ? s.stride(0) : 0, y.stride(0),
            static_cast<float>(eps), act, rms, has_r, has_w, has_b};
  if (a.m == 0 || a.n == 0) return;
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : x.scalar_type());
  const ScalarType yt = y.scalar_type();
  const int64_t grain = std::max<int64_t>(1, 16384 / a.n);
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  if (avx2::available()) {
    std::vector<float> wstore, bstore;
    const float* wf = as_f32(a.w, wt, a.n, 1.f, wstore);
    const float* bf = as_f32(a.b, wt, a.n, 0.f, bstore);
    dispatch_float(x.scalar_type(), "x", [&]<typename T>() {
      norm::dispatch_act(act, [&]<int A>() {
        norm::dispatch_out<T>(yt, [&]<typename Y>() {
          torch::stable::parallel_for(0, a.m, grain,
                                      [&](int64_t lo, int64_t hi) { fwd_rows_avx2<T, Y, A>(a, wf, bf, lo, hi); });
        });
      });
    });
    return;
  }
#endif
  dispatch_float2(x.scalar_type(), "x", wt, "weight", [&]<typename T, typename W>() {
    norm::dispatch_out<T>(yt, [&]<typename Y>() {
      torch::stable::parallel_for(0, a.m, grain, [&](int64_t lo, int64_t hi) { fwd_rows<T, W, Y>(a, lo, hi); });
    });
  });
}

struct BwdArgs {
  const void* dy; const void* xs; const void* w; const void* b; const float* mean; const float* rstd;
  const void* ds; void* dx; float* dwp; float* dbp;
  int64_t m, n, sdy0, sdy1, sxs, sds0, sds1, sdx, rows_per_chunk;
  int64_t act;
  bool rms, has_w, has_b, has_ds;
};

// Chunk c's dW / dB partial rows (null where there is no weight / bias), zeroed.
void zeroed_partials(const BwdArgs& a, int64_t c, float*& dwp, float*& dbp) {
  dwp = a.has_w ? a.dwp + c * a.n : nullptr;
  dbp = a.has_b ? a.dbp + c * a.n : nullptr;
  if (dwp) std::fill(dwp, dwp + a.n, 0.f);
  if (dbp) std::fill(dbp, dbp + a.n, 0.f);
}

// One chunk of rows: dx for each, and the chunk's dW/dB partial row.
template <typename T, typename W, typename Y>
void bwd_chunk(const BwdArgs& a, int64_t c) {
  std::vector<float> xhat(a.n), dz(a.n);
  const W* w = static_cast<const W*>(a.w);
  const W* b = static_cast<const W*>(a.b);
  float *dwp, *dbp;
  zeroed_partials(a, c, dwp, dbp);
  const int64_t begin = c * a.rows_per_chunk, end = std::min(a.m, begin + a.rows_per_chunk);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.xs) + i * a.sxs;
    const Y* dyr = static_cast<const Y*>(a.dy) + i * a.sdy0;
    const float mean = a.rms ? 0.f : a.mean[i], rstd = a.rstd[i];
    double c1 = 0.0, c2 = 0.0;
    for (int64_t j = 0; j < a.n; ++j) {
      const float xh = (static_cast<float>(xr[j]) - mean) * rstd;
      float z = xh;
      if (a.has_w) z *= static_cast<float>(w[j]);
      if (a.has_b) z += static_cast<float>(b[j]);
      const float d = static_cast<float>(dyr[j * a.sdy1]) * act_grad(z, a.act);
      xhat[j] = xh;
      dz[j] = d;
      if (dwp) dwp[j] += d * xh;
      if (dbp) dbp[j] += d;
      const float g = a.has_w ? d * static_cast<float>(w[j]) : d;
      c1 += g;
      c2 += static_cast<double>(g) * xh;
    }
    const float m1 = a.rms ? 0.f : static_cast<float>(c1 / static_cast<double>(a.n));
    const float m2 = static_cast<float>(c2 / static_cast<double>(a.n));
    T* dxr = static_cast<T*>(a.dx) + i * a.sdx;
    const T* dsr = a.has_ds ? static_cast<const T*>(a.ds) + i * a.sds0 : nullptr;
    for (int64_t j = 0; j < a.n; ++j) {
      const float g = a.has_w ? dz[j] * static_cast<float>(w[j]) : dz[j];
      float v = (g - m1 - xhat[j] * m2) * rstd;
      if (dsr) v += static_cast<float>(dsr[j * a.sds1]);
      dxr[j] = static_cast<T>(v);
    }
  }
}

#ifdef FUSEDOPS_HAVE_AVX2_PATH
// bwd_chunk on 8 lanes: dy and ds with unit column stride.
template <typename T, typename Y, int A>
FUSEDOPS_AVX2 void bwd_chunk_avx2(const BwdArgs& a, const float* w, const float* b, int64_t c) {
  const int64_t n = a.n, n8 = n & ~int64_t{7};
  std::vector<float> xhat(n), gbuf(n);
  float *dwp, *dbp;
  zeroed_partials(a, c, dwp, dbp);
  const int64_t begin = c * a.rows_per_chunk, end = std::min(a.m, begin + a.rows_per_chunk);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.xs) + i * a.sxs;
    const Y* dyr = static_cast<const Y*>(a.dy) + i * a.sdy0;
    const float mean = a.rms ? 0.f : a.mean[i], rstd = a.rstd[i];
    const __m256 mv = _mm256_set1_ps(mean), rs = _mm256_set1_ps(rstd);
    __m256d c1a = _mm256_setzero_pd(), c1b = _mm256_setzero_pd(), c2a = _mm256_setzero_pd(),
            c2b = _mm256_setzero_pd();
    double c1 = 0.0, c2 = 0.0;
    int64_t j = 0;
    for (; j < n8; j += 8) {
      const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(avx2::load8(xr + j), mv), rs);
      const __m256 wv = _mm256_loadu_ps(w + j);
      const __m256 z = _mm256_fmadd_ps(xh, wv, _mm256_loadu_ps(b + j));
      const __m256 d = _mm256_mul_ps(avx2::load8(dyr + j), act_grad8<A>(z));
      if (dwp) _mm256_storeu_ps(dwp + j, _mm256_fmadd_ps(d, xh, _mm256_loadu_ps(dwp + j)));
      if (dbp) _mm256_storeu_ps(dbp + j, _mm256_add_ps(d, _mm256_loadu_ps(dbp + j)));
      const __m256 g = _mm256_mul_ps(d, wv);
      _mm256_storeu_ps(xhat.data() + j, xh);
      _mm256_storeu_ps(gbuf.data() + j, g);
      avx2::add_pd(c1a, c1b, g);
      avx2::fma_pd(c2a, c2b, g, xh);
    }
    for (; j < n; ++j) {
      const float xh = (static_cast<float>(xr[j]) - mean) * rstd;
      const float d = static_cast<float>(dyr[j]) * act_grad(std::fma(xh, w[j], b[j]), A);
      if (dwp) dwp[j] = std::fma(d, xh, dwp[j]);
      if (dbp) dbp[j] += d;
      const float g = d * w[j];
      xhat[j] = xh;
      gbuf[j] = g;
      c1 += g;
      c2 += static_cast<double>(g) * xh;
    }
    c1 += avx2::hsum_pd(_mm256_add_pd(c1a, c1b));
    c2 += avx2::hsum_pd(_mm256_add_pd(c2a, c2b));
    const float m1 = a.rms ? 0.f : static_cast<float>(c1 / static_cast<double>(n));
    const float m2 = static_cast<float>(c2 / static_cast<double>(n));
    const __m256 m1v = _mm256_set1_ps(m1), m2v = _mm256_set1_ps(m2);
    T* dxr = static_cast<T*>(a.dx) + i * a.sdx;
    const T* dsr = a.has_ds ? static_cast<const T*>(a.ds) + i * a.sds0 : nullptr;
    for (j = 0; j < n8; j += 8) {
      const __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(xhat.data() + j), m2v,
                                        _mm256_sub_ps(_mm256_loadu_ps(gbuf.data() + j), m1v));
      __m256 v = _mm256_mul_ps(t, rs);
      if (dsr) v = _mm256_add_ps(v, avx2::load8(dsr + j));
      avx2::store8(dxr + j, v);
    }
    for (; j < n; ++j) {
      float v = std::fma(-xhat[j], m2, gbuf[j] - m1) * rstd;
      if (dsr) v += static_cast<float>(dsr[j]);
      dxr[j] = static_cast<T>(v);
    }
  }
}
#endif

void norm_act_bwd(Tensor dy, Tensor xs, Tensor w, Tensor b, Tensor mean, Tensor rstd, Tensor ds, Tensor dx,
                  Tensor dwp, Tensor dbp, int64_t act, bool rms, bool has_w, bool has_b, bool has_ds) {
  STD_TORCH_CHECK(xs.is_cpu() && dy.is_cpu(), "fusedops_C::norm_act_bwd (CPU): tensors must be on the CPU");
  STD_TORCH_CHECK(xs.dim() == 2 && dx.dim() == 2 && dy.dim() == 2 && norm::unit_columns(xs) &&
                      norm::unit_columns(dx),
                  "fusedops_C::norm_act_bwd (CPU): xs, dx must be 2-D with unit column stride, dy 2-D");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_bwd (CPU): weight and bias must share a dtype");
  const int64_t chunks = has_w ? dwp.size(0) : (has_b ? dbp.size(0) : 1);
  BwdArgs a{dy.data_ptr(), xs.data_ptr(), has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
            rms ? nullptr : static_cast<const float*>(mean.data_ptr()), static_cast<const float*>(rstd.data_ptr()),
            has_ds ? ds.data_ptr() : nullptr, dx.data_ptr(), has_w ? static_cast<float*>(dwp.data_ptr()) : nullptr,
            has_b ? static_cast<float*>(dbp.data_ptr()) : nullptr, xs.size(0), xs.size(1), dy.stride(0),
            dy.stride(1), xs.stride(0), has_ds ? ds.stride(0) : 0, has_ds ? ds.stride(1) : 0, dx.stride(0), 0, act,
            rms, has_w, has_b, has_ds};
  if (a.m == 0 || a.n == 0) return;
  // With no partials to write, chunks only split the work.
  const int64_t nchunks = (has_w || has_b) ? chunks : std::min<int64_t>(a.m, 64);
  a.rows_per_chunk = (a.m + nchunks - 1) / nchunks;
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : xs.scalar_type());
  const ScalarType dyt = dy.scalar_type();
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  if (avx2::available() && a.sdy1 == 1 && (!has_ds || a.sds1 == 1)) {
    std::vector<float> wstore, bstore;
    const float* wf = as_f32(a.w, wt, a.n, 1.f, wstore);
    const float* bf = as_f32(a.b, wt, a.n, 0.f, bstore);
    dispatch_float(xs.scalar_type(), "s", [&]<typename T>() {
      norm::dispatch_act(act, [&]<int A>() {
        norm::dispatch_out<T>(dyt, [&]<typename Y>() {
          torch::stable::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t c = lo; c < hi; ++c) bwd_chunk_avx2<T, Y, A>(a, wf, bf, c);
          });
        });
      });
    });
    return;
  }
#endif
  dispatch_float2(xs.scalar_type(), "s", wt, "weight", [&]<typename T, typename W>() {
    norm::dispatch_out<T>(dyt, [&]<typename Y>() {
      torch::stable::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) bwd_chunk<T, W, Y>(a, c);
      });
    });
  });
}

}  // namespace
}  // namespace fusedops

// The ops: outputs allocated here, any leading shape (csrc/norm_ops.h).
namespace fusedops {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_act_forward(Tensor x, std::optional<Tensor> r,
                                                            std::optional<Tensor> w, std::optional<Tensor> b,
                                                            double eps, int64_t act, bool rms, int64_t mode,
                                                            std::optional<ScalarType> y_dtype) {
  STD_TORCH_CHECK(x.is_cpu(), "fusedops_C::norm_act_fwd (CPU): x must be on the CPU");
  return norm::forward(norm_act_fwd, x, r, std::move(w), std::move(b), eps, act, rms, mode, y_dtype);
}

// Fixed row chunks, independent of the thread count (as the partial rows on CUDA): at
// most 64, each of at least 16K elements, as the forward's tasks (a chunk's partial rows
// are zeroed, written and summed whatever its size: one row a chunk cost LN 64x4096 a third
// of its backward).
int64_t partial_rows(int64_t m, int64_t n, const Tensor& /*s*/, const Tensor& /*dy*/) {
  return std::max<int64_t>(1, std::min<int64_t>({m, int64_t{64}, m * n / 16384}));
}

template <typename W>
void sum_rows(const float* part, W* out, int64_t p, int64_t n) {
  torch::stable::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    // row by row (contiguous, vectorisable), each column still summed in row order
    std::vector<float> acc(hi - lo, 0.f);
    for (int64_t i = 0; i < p; ++i) {
      const float* row = part + i * n + lo;
      for (int64_t j = 0; j < hi - lo; ++j) acc[j] += row[j];
    }
    for (int64_t j = lo; j < hi; ++j) out[j] = static_cast<W>(acc[j - lo]);
  });
}

// dW / dB: the (P, N) fp32 partial rows summed per column in row order, in fp32, rounded
// once to the parameter's dtype.
void sum_partials(const Tensor& dwp, Tensor& dw, bool sum_w, const Tensor& dbp, Tensor& db, bool sum_b, int64_t p,
                  int64_t n) {
  for (int k = 0; k < 2; ++k) {
    if (!(k == 0 ? sum_w : sum_b)) continue;
    const Tensor& part = k == 0 ? dwp : dbp;
    Tensor& out = k == 0 ? dw : db;
    dispatch_float(out.scalar_type(), k == 0 ? "weight" : "bias", [&]<typename W>() {
      sum_rows<W>(static_cast<const float*>(part.data_ptr()), static_cast<W*>(out.data_ptr()), p, n);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> norm_act_backward(Tensor dy, Tensor s, std::optional<Tensor> w,
                                                     std::optional<Tensor> b, std::optional<Tensor> mean, Tensor rstd,
                                                     std::optional<Tensor> ds, int64_t act) {
  STD_TORCH_CHECK(s.is_cpu(), "fusedops_C::norm_act_bwd (CPU): s must be on the CPU");
  return norm::backward(partial_rows, norm_act_bwd, sum_partials, dy, s, w, b, mean, rstd, ds, act);
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) {
  m.impl("norm_act_fwd", TORCH_BOX(&fusedops::norm_act_forward));
  m.impl("norm_act_bwd", TORCH_BOX(&fusedops::norm_act_backward));
}
