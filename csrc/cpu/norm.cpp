// LayerNorm / RMSNorm + activation (+ residual add) on the CPU, forward and backward.
// Rows in parallel; statistics in double, math in fp32; dW/dB from fp32 partials of fixed
// row chunks (independent of the thread count), summed by the caller in chunk order.
#include "../common.h"
#include "../norm_ops.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace fusedops {
namespace {

inline float act_fwd(float z, int64_t act) {
  switch (act) {
    case 1: return z > 0.f ? z : 0.f;
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

void norm_act_fwd(Tensor x, Tensor r, Tensor s, Tensor y, Tensor w, Tensor b, Tensor mean, Tensor rstd, double eps,
                  int64_t act, bool rms, bool has_r, bool has_w, bool has_b) {
  STD_TORCH_CHECK(x.is_cpu() && y.is_cpu(), "fusedops_C::norm_act_fwd (CPU): tensors must be on the CPU");
  STD_TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
                  "fusedops_C::norm_act_fwd (CPU): x and y must be 2-D with unit column stride");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_fwd (CPU): weight and bias must share a dtype");
  STD_TORCH_CHECK(y.scalar_type() == x.scalar_type() || y.scalar_type() == ScalarType::Float,
                  "fusedops_C::norm_act_fwd (CPU): y must be x's dtype or float32");
  FwdArgs a{x.data_ptr(), has_r ? r.data_ptr() : nullptr, has_r ? s.data_ptr() : nullptr, y.data_ptr(),
            has_w ? w.data_ptr() : nullptr, has_b ? b.data_ptr() : nullptr,
            rms ? nullptr : static_cast<float*>(mean.data_ptr()), static_cast<float*>(rstd.data_ptr()),
            x.size(0), x.size(1), x.stride(0), has_r ? r.stride(0) : 0, has_r ? s.stride(0) : 0, y.stride(0),
            static_cast<float>(eps), act, rms, has_r, has_w, has_b};
  if (a.m == 0 || a.n == 0) return;
  const ScalarType wt = has_w ? w.scalar_type() : (has_b ? b.scalar_type() : x.scalar_type());
  const bool y_float = y.scalar_type() != x.scalar_type();
  const int64_t grain = std::max<int64_t>(1, 16384 / a.n);
  dispatch_float2(x.scalar_type(), "x", wt, "weight", [&]<typename T, typename W>() {
    if (y_float) {
      torch::stable::parallel_for(0, a.m, grain, [&](int64_t lo, int64_t hi) { fwd_rows<T, W, float>(a, lo, hi); });
    } else {
      torch::stable::parallel_for(0, a.m, grain, [&](int64_t lo, int64_t hi) { fwd_rows<T, W, T>(a, lo, hi); });
    }
  });
}

struct BwdArgs {
  const void* dy; const void* xs; const void* w; const void* b; const float* mean; const float* rstd;
  const void* ds; void* dx; float* dwp; float* dbp;
  int64_t m, n, sdy0, sdy1, sxs, sds0, sds1, sdx, rows_per_chunk;
  int64_t act;
  bool rms, has_w, has_b, has_ds;
};

// One chunk of rows: dx for each, and the chunk's dW/dB partial row.
template <typename T, typename W, typename Y>
void bwd_chunk(const BwdArgs& a, int64_t c) {
  std::vector<float> xhat(a.n), dz(a.n);
  const W* w = static_cast<const W*>(a.w);
  const W* b = static_cast<const W*>(a.b);
  float* dwp = a.has_w ? a.dwp + c * a.n : nullptr;
  float* dbp = a.has_b ? a.dbp + c * a.n : nullptr;
  for (int64_t j = 0; j < a.n; ++j) {
    if (dwp) dwp[j] = 0.f;
    if (dbp) dbp[j] = 0.f;
  }
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

void norm_act_bwd(Tensor dy, Tensor xs, Tensor w, Tensor b, Tensor mean, Tensor rstd, Tensor ds, Tensor dx,
                  Tensor dwp, Tensor dbp, int64_t act, bool rms, bool has_w, bool has_b, bool has_ds) {
  STD_TORCH_CHECK(xs.is_cpu() && dy.is_cpu(), "fusedops_C::norm_act_bwd (CPU): tensors must be on the CPU");
  STD_TORCH_CHECK(xs.dim() == 2 && dx.dim() == 2 && dy.dim() == 2 && xs.stride(1) == 1 && dx.stride(1) == 1,
                  "fusedops_C::norm_act_bwd (CPU): xs, dx must be 2-D with unit column stride, dy 2-D");
  STD_TORCH_CHECK(!has_w || !has_b || w.scalar_type() == b.scalar_type(),
                  "fusedops_C::norm_act_bwd (CPU): weight and bias must share a dtype");
  STD_TORCH_CHECK(dy.scalar_type() == xs.scalar_type() || dy.scalar_type() == ScalarType::Float,
                  "fusedops_C::norm_act_bwd (CPU): dy must be s's dtype or float32");
  STD_TORCH_CHECK(!has_ds || ds.scalar_type() == xs.scalar_type(),
                  "fusedops_C::norm_act_bwd (CPU): ds must have s's dtype");
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
  const bool dy_float = dy.scalar_type() != xs.scalar_type();
  dispatch_float2(xs.scalar_type(), "s", wt, "weight", [&]<typename T, typename W>() {
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        if (dy_float) bwd_chunk<T, W, float>(a, c);
        else bwd_chunk<T, W, T>(a, c);
      }
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
                                                            bool y_float) {
  STD_TORCH_CHECK(x.is_cpu(), "fusedops_C::norm_act_fwd (CPU): x must be on the CPU");
  return norm::forward(norm_act_fwd, x, r, std::move(w), std::move(b), eps, act, rms, mode, y_float);
}

// Fixed row chunks, independent of the thread count (as the partial rows on CUDA).
int64_t partial_rows(int64_t m, int64_t /*n*/, const Tensor& /*s*/, const Tensor& /*dy*/) {
  return std::max<int64_t>(1, std::min<int64_t>(m, 64));
}

template <typename W>
void sum_rows(const float* part, W* out, int64_t p, int64_t n) {
  torch::stable::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < p; ++i) acc += part[i * n + j];
      out[j] = static_cast<W>(acc);
    }
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
