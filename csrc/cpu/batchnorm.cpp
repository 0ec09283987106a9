// BatchNorm(+activation) kernels on the CPU for a conv output y [N, C, H·W] (see
// csrc/batchnorm.cpp for the contract). Parallel over channel blocks; each channel is
// reduced sequentially in a fixed order (deterministic, whatever the thread count), with
// fp64 accumulators and an exact two-pass variance. Channels_last reads blocks of 16
// neighbouring channels per position; contiguous NCHW reads each channel's H·W run.
// On x86-64 CPUs with AVX2 + FMA + F16C both layouts run 8 lanes at a time (channels_last:
// 8 neighbouring channels; NCHW: 8 positions of one channel's run; vec_avx2.h), where the
// block's channel count (channels_last) is a multiple of 8; the scalar loops take the rest.
#include "../batchnorm_act.h"
#include "../batchnorm_kernels.h"
#include "../common.h"
#include "vec_avx2.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fusedops {
namespace {

struct Geo {
  int64_t n, c, hw, sn, sc, shw;
};

Geo geometry(const Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), t.stride(0), t.stride(1), t.stride(3)};
}

int64_t channel_block(const Geo& g) { return g.sc == 1 ? 16 : 1; }

void check(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "fusedops_C (CPU): ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.dim() == 4, "fusedops_C (CPU): ", name, " must be 4-D");
}

void check_channel(const Tensor& t, int64_t c, const char* name) {
  STD_TORCH_CHECK(t.is_cpu() && t.dim() == 1 && t.size(0) == c && t.is_contiguous() &&
                      t.scalar_type() == ScalarType::Float,
                  "fusedops_C (CPU): ", name, " must be a contiguous fp32 CPU tensor of shape (C,)");
}

// fn(c, offset) over every element of channels [c0, c1), in (n, hw) order per channel.
template <typename Fn>
inline void for_block(const Geo& g, int64_t c0, int64_t c1, Fn&& fn) {
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t p = 0; p < g.hw; ++p) {
      const int64_t base = n * g.sn + p * g.shw;
      for (int64_t c = c0; c < c1; ++c) fn(c, base + c * g.sc);
    }
}

#ifdef FUSEDOPS_HAVE_AVX2_PATH
// ---- AVX2 path -----------------------------------------------------------------------------
// How the vector kernels walk the block of channels [c0, c1): channels_last with a multiple
// of 8 channels in the block (8 neighbouring channels a vector), NCHW runs (one channel a
// block, 8 positions of a sample's H·W run a vector), or not at all (the scalar loops).
enum class Walk { kNone, kChannelsLast, kRuns };

Walk walk_of(const Geo& g, int64_t c0, int64_t c1) {
  if (g.sc == 1 && g.c > 1) return (c1 - c0) % 8 == 0 ? Walk::kChannelsLast : Walk::kNone;
  return g.shw == 1 ? Walk::kRuns : Walk::kNone;
}

FUSEDOPS_AVX2 inline __m256 bn_act8(__m256 z, int act, __m256 slope) {
  switch (act) {
    case kRelu: return avx2::relu8(z);
    case kRelu6: return _mm256_min_ps(_mm256_set1_ps(6.f), avx2::relu8(z));
    case kSilu: return avx2::silu8(z);
    case kGelu: return avx2::gelu8(z);
    case kGeluTanh: return avx2::gelu_tanh8(z);
    case kLeakyRelu:
      return _mm256_blendv_ps(_mm256_mul_ps(z, slope), z, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ));
    default: return z;
  }
}

FUSEDOPS_AVX2 inline __m256 bn_act_grad8(__m256 z, int act, __m256 slope) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  switch (act) {
    case kRelu: return avx2::relu_grad8(z);
    case kRelu6:
      return _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ),
                                         _mm256_cmp_ps(z, _mm256_set1_ps(6.f), _CMP_LT_OQ)), one);
    case kSilu: return avx2::silu_grad8(z);
    case kGelu: return avx2::gelu_grad8(z);
    case kGeluTanh: return avx2::gelu_tanh_grad8(z);
    case kLeakyRelu: return _mm256_blendv_ps(slope, one, _mm256_cmp_ps(z, zero, _CMP_GT_OQ));
    default: return one;
  }
}

// Mean and exact two-pass variance of channels [c0, c1) (the block), double accumulators.
template <typename T>
FUSEDOPS_AVX2 void stats_block_avx2(const T* yp, const Geo& g, int64_t c0, int64_t c1, Walk walk, double* mean,
                                    double* sq) {
  const double inv_m = 1.0 / static_cast<double>(g.n * g.hw);
  if (walk == Walk::kChannelsLast) {
    const int64_t groups = (c1 - c0) / 8;
    __m256d acc[4];  // (channels_last blocks hold at most 16 channels: 2 groups of 8)
    for (int pass = 0; pass < 2; ++pass) {
      __m256d mv[4];
      for (int64_t k = 0; k < groups; ++k) {
        acc[2 * k] = acc[2 * k + 1] = _mm256_setzero_pd();
        if (pass == 1) {
          mv[2 * k] = _mm256_loadu_pd(mean + 8 * k);
          mv[2 * k + 1] = _mm256_loadu_pd(mean + 8 * k + 4);
        }
      }
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t p = 0; p < g.hw; ++p) {
          const T* q = yp + n * g.sn + p * g.shw + c0;
          for (int64_t k = 0; k < groups; ++k) {
            const __m256 v = avx2::load8(q + 8 * k);
            if (pass == 0) {
              avx2::add_pd(acc[2 * k], acc[2 * k + 1], v);
            } else {
              avx2::sq_dev_pd(acc[2 * k], acc[2 * k + 1], v, mv[2 * k], mv[2 * k + 1]);
            }
          }
        }
      double* out = pass == 0 ? mean : sq;
      for (int64_t k = 0; k < groups; ++k) {
        _mm256_storeu_pd(out + 8 * k, acc[2 * k]);
        _mm256_storeu_pd(out + 8 * k + 4, acc[2 * k + 1]);
      }
      if (pass == 0)
        for (int64_t c = 0; c < c1 - c0; ++c) mean[c] *= inv_m;
    }
    return;
  }
  // runs: one channel (c1 == c0 + 1), each sample's H·W run
  const int64_t hw8 = g.hw & ~int64_t{7};
  double s = 0.0, s2 = 0.0;
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (int64_t n = 0; n < g.n; ++n) {
    const T* q = yp + n * g.sn + c0 * g.sc;
    int64_t p = 0;
    for (; p < hw8; p += 8) avx2::add_pd(a0, a1, avx2::load8(q + p));
    for (; p < g.hw; ++p) s += static_cast<float>(q[p]);
  }
  s = (s + avx2::hsum_pd(_mm256_add_pd(a0, a1))) * inv_m;
  const __m256d mv = _mm256_set1_pd(s);
  a0 = a1 = _mm256_setzero_pd();
  for (int64_t n = 0; n < g.n; ++n) {
    const T* q = yp + n * g.sn + c0 * g.sc;
    int64_t p = 0;
    for (; p < hw8; p += 8) avx2::sq_dev_pd(a0, a1, avx2::load8(q + p), mv, mv);
    for (; p < g.hw; ++p) {
      const double d = static_cast<double>(static_cast<float>(q[p])) - s;
      s2 += d * d;
    }
  }
  mean[0] = s;
  sq[0] = s2 + avx2::hsum_pd(_mm256_add_pd(a0, a1));
}

// z = act(y·scale + shift) over channels [c0, c1); scale, shift per channel of the block.
template <typename T>
FUSEDOPS_AVX2 void apply_block_avx2(const T* yp, T* zp, const Geo& g, int64_t c0, int64_t c1, Walk walk,
                                    const float* scale, const float* shift, int act, float slope) {
  const __m256 sl = _mm256_set1_ps(slope);
  if (walk == Walk::kChannelsLast) {
    const int64_t groups = (c1 - c0) / 8;
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t p = 0; p < g.hw; ++p) {
        const int64_t o = n * g.sn + p * g.shw + c0;
        for (int64_t k = 0; k < groups; ++k) {
          const __m256 z = _mm256_fmadd_ps(avx2::load8(yp + o + 8 * k), _mm256_loadu_ps(scale + 8 * k),
                                           _mm256_loadu_ps(shift + 8 * k));
          avx2::store8(zp + o + 8 * k, bn_act8(z, act, sl));
        }
      }
    return;
  }
  const int64_t hw8 = g.hw & ~int64_t{7};
  const __m256 sc = _mm256_set1_ps(scale[0]), sh = _mm256_set1_ps(shift[0]);
  for (int64_t n = 0; n < g.n; ++n) {
    const int64_t o = n * g.sn + c0 * g.sc;
    int64_t p = 0;
    for (; p < hw8; p += 8)
      avx2::store8(zp + o + p, bn_act8(_mm256_fmadd_ps(avx2::load8(yp + o + p), sc, sh), act, sl));
    for (; p < g.hw; ++p)
      zp[o + p] = static_cast<T>(bn_act(std::fma(static_cast<float>(yp[o + p]), scale[0], shift[0]), act, slope));
  }
}

// gg = dz·act'(x̂w + b) and x̂ = (y − mean)·r of 8 lanes, with the lanes' channel parameters.
template <typename T, typename TD>
FUSEDOPS_AVX2 inline __m256 bn_grad8(const T* y, const TD* dz, __m256 mean, __m256 r, __m256 w, __m256 b, int act,
                                     __m256 slope, __m256& xh) {
  xh = _mm256_mul_ps(_mm256_sub_ps(avx2::load8(y), mean), r);
  return _mm256_mul_ps(avx2::load8(dz), bn_act_grad8(_mm256_fmadd_ps(xh, w, b), act, slope));
}

// Backward over channels [c0, c1): per channel (of the block) mean, invstd, weight, bias;
// pass 1 sums gg = dz·act'(x̂w + b) and gg·x̂ (double), pass 2 writes
// dy = w·r·(gg − Σgg/m − x̂·Σgg·x̂/m). sum_g / sum_gx: the block's float sums (out).
template <typename T, typename TD>
FUSEDOPS_AVX2 void backward_block_avx2(const T* yp, const TD* dzp, T* dyp, const Geo& g, const Geo& gd, int64_t c0,
                                       int64_t c1, Walk walk, const float* mp, const float* rp, const float* wp,
                                       const float* bp, int act, float slope, float* sum_g, float* sum_gx) {
  const __m256 sl = _mm256_set1_ps(slope);
  const float inv_m = 1.f / static_cast<float>(g.n * g.hw);
  if (walk == Walk::kChannelsLast) {
    const int64_t groups = (c1 - c0) / 8;
    __m256 mean[2], r[2], w[2], b[2];
    __m256d s1[4], s2[4];
    for (int64_t k = 0; k < groups; ++k) {
      mean[k] = _mm256_loadu_ps(mp + c0 + 8 * k);
      r[k] = _mm256_loadu_ps(rp + c0 + 8 * k);
      w[k] = _mm256_loadu_ps(wp + c0 + 8 * k);
      b[k] = _mm256_loadu_ps(bp + c0 + 8 * k);
      s1[2 * k] = s1[2 * k + 1] = s2[2 * k] = s2[2 * k + 1] = _mm256_setzero_pd();
    }
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t p = 0; p < g.hw; ++p) {
        const T* y = yp + n * g.sn + p * g.shw + c0;
        const TD* dz = dzp + n * gd.sn + p * gd.shw + c0;
        for (int64_t k = 0; k < groups; ++k) {
          __m256 xh;
          const __m256 gg = bn_grad8(y + 8 * k, dz + 8 * k, mean[k], r[k], w[k], b[k], act, sl, xh);
          avx2::add_pd(s1[2 * k], s1[2 * k + 1], gg);
          avx2::fma_pd(s2[2 * k], s2[2 * k + 1], gg, xh);
        }
      }
    double t1[16], t2[16];
    for (int64_t k = 0; k < groups; ++k) {
      _mm256_storeu_pd(t1 + 8 * k, s1[2 * k]);
      _mm256_storeu_pd(t1 + 8 * k + 4, s1[2 * k + 1]);
      _mm256_storeu_pd(t2 + 8 * k, s2[2 * k]);
      _mm256_storeu_pd(t2 + 8 * k + 4, s2[2 * k + 1]);
    }
    float mg[16], mgx[16], k_wr[16];
    for (int64_t c = 0; c < c1 - c0; ++c) {
      sum_g[c] = static_cast<float>(t1[c]);
      sum_gx[c] = static_cast<float>(t2[c]);
      mg[c] = sum_g[c] * inv_m;
      mgx[c] = sum_gx[c] * inv_m;
      k_wr[c] = wp[c0 + c] * rp[c0 + c];
    }
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t p = 0; p < g.hw; ++p) {
        const int64_t o = n * g.sn + p * g.shw + c0;
        const TD* dz = dzp + n * gd.sn + p * gd.shw + c0;
        for (int64_t k = 0; k < groups; ++k) {
          __m256 xh;
          const __m256 gg = bn_grad8(yp + o + 8 * k, dz + 8 * k, mean[k], r[k], w[k], b[k], act, sl, xh);
          const __m256 t = _mm256_fnmadd_ps(xh, _mm256_loadu_ps(mgx + 8 * k),
                                            _mm256_sub_ps(gg, _mm256_loadu_ps(mg + 8 * k)));
          avx2::store8(dyp + o + 8 * k, _mm256_mul_ps(_mm256_loadu_ps(k_wr + 8 * k), t));
        }
      }
    return;
  }
  // runs: one channel
  const float m0 = mp[c0], r0 = rp[c0], w0 = wp[c0], b0 = bp[c0];
  const __m256 mean = _mm256_set1_ps(m0), r = _mm256_set1_ps(r0), w = _mm256_set1_ps(w0), b = _mm256_set1_ps(b0);
  const int64_t hw8 = g.hw & ~int64_t{7};
  auto grad1 = [&](float y, float dz, float& xh) {
    xh = (y - m0) * r0;
    return dz * bn_act_grad(std::fma(xh, w0, b0), act, slope);
  };
  __m256d s1a = _mm256_setzero_pd(), s1b = _mm256_setzero_pd(), s2a = _mm256_setzero_pd(), s2b = _mm256_setzero_pd();
  double t1 = 0.0, t2 = 0.0;
  for (int64_t n = 0; n < g.n; ++n) {
    const T* y = yp + n * g.sn + c0 * g.sc;
    const TD* dz = dzp + n * gd.sn + c0 * gd.sc;
    int64_t p = 0;
    for (; p < hw8; p += 8) {
      __m256 xh;
      const __m256 gg = bn_grad8(y + p, dz + p, mean, r, w, b, act, sl, xh);
      avx2::add_pd(s1a, s1b, gg);
      avx2::fma_pd(s2a, s2b, gg, xh);
    }
    for (; p < g.hw; ++p) {
      float xh;
      const float gg = grad1(static_cast<float>(y[p]), static_cast<float>(dz[p]), xh);
      t1 += gg;
      t2 += static_cast<double>(gg) * xh;
    }
  }
  sum_g[0] = static_cast<float>(t1 + avx2::hsum_pd(_mm256_add_pd(s1a, s1b)));
  sum_gx[0] = static_cast<float>(t2 + avx2::hsum_pd(_mm256_add_pd(s2a, s2b)));
  const float mg = sum_g[0] * inv_m, mgx = sum_gx[0] * inv_m, kwr = w0 * r0;
  const __m256 mgv = _mm256_set1_ps(mg), mgxv = _mm256_set1_ps(mgx), kv = _mm256_set1_ps(kwr);
  for (int64_t n = 0; n < g.n; ++n) {
    const int64_t o = n * g.sn + c0 * g.sc;
    const TD* dz = dzp + n * gd.sn + c0 * gd.sc;
    int64_t p = 0;
    for (; p < hw8; p += 8) {
      __m256 xh;
      const __m256 gg = bn_grad8(yp + o + p, dz + p, mean, r, w, b, act, sl, xh);
      avx2::store8(dyp + o + p, _mm256_mul_ps(kv, _mm256_fnmadd_ps(xh, mgxv, _mm256_sub_ps(gg, mgv))));
    }
    for (; p < g.hw; ++p) {
      float xh;
      const float gg = grad1(static_cast<float>(yp[o + p]), static_cast<float>(dz[p]), xh);
      dyp[o + p] = static_cast<T>(kwr * std::fma(-xh, mgx, gg - mg));
    }
  }
}

// The walk of the vector kernels for this block: kNone without AVX2 or for other layouts.
Walk vector_walk(const Geo& g, int64_t c0, int64_t c1) { return avx2::available() ? walk_of(g, c0, c1) : Walk::kNone; }
#endif

// The block through the vector kernels: false, writing nothing, where they do not take it
// (no AVX2 path in this build or on this CPU, or a layout of Walk::kNone); the scalar loops
// then run.
template <typename T>
bool stats_block(const T* yp, const Geo& g, int64_t c0, int64_t c1, double* mean, double* sq) {
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  const Walk walk = vector_walk(g, c0, c1);
  if (walk == Walk::kNone) return false;
  stats_block_avx2(yp, g, c0, c1, walk, mean, sq);
  return true;
#else
  return false;
#endif
}

template <typename T>
bool apply_block(const T* yp, T* zp, const Geo& g, int64_t c0, int64_t c1, const float* mp, const float* rp,
                 const float* wp, const float* bp, int act, float slope) {
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  const Walk walk = vector_walk(g, c0, c1);
  if (walk == Walk::kNone) return false;
  float scale[16], shift[16];
  for (int64_t c = c0; c < c1; ++c) {
    scale[c - c0] = rp[c] * wp[c];
    shift[c - c0] = bp[c] - mp[c] * scale[c - c0];
  }
  apply_block_avx2(yp, zp, g, c0, c1, walk, scale, shift, act, slope);
  return true;
#else
  return false;
#endif
}

template <typename T, typename TD>
bool backward_block(const T* yp, const TD* dzp, T* dyp, const Geo& g, const Geo& gd, int64_t c0, int64_t c1,
                    const float* mp, const float* rp, const float* wp, const float* bp, int act, float slope,
                    float* sum_g, float* sum_gx) {
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  const Walk walk = vector_walk(g, c0, c1);
  if (walk == Walk::kNone || walk != walk_of(gd, c0, c1)) return false;
  backward_block_avx2(yp, dzp, dyp, g, gd, c0, c1, walk, mp, rp, wp, bp, act, slope, sum_g, sum_gx);
  return true;
#else
  return false;
#endif
}

}  // namespace

// The entry points (csrc/batchnorm_kernels.h), registered below and called by csrc/convbn.cpp.
namespace bn_cpu {

void bn_stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var) {
  check(y, "y");
  const Geo g = geometry(y);
  check_channel(mean, g.c, "mean");
  check_channel(invstd, g.c, "invstd");
  check_channel(var, g.c, "var");
  const int64_t m = g.n * g.hw, cb = channel_block(g);
  float* mp = mean.mutable_data_ptr<float>();
  float* rp = invstd.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    const T* yp = y.const_data_ptr<T>();
    torch::stable::parallel_for(0, (g.c + cb - 1) / cb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> s(cb), s2(cb);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * cb, c1 = std::min(g.c, c0 + cb);
        std::fill(s.begin(), s.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        if (!stats_block(yp, g, c0, c1, s.data(), s2.data())) {
          for_block(g, c0, c1, [&](int64_t c, int64_t o) { s[c - c0] += static_cast<float>(yp[o]); });
          for (int64_t c = c0; c < c1; ++c) s[c - c0] /= static_cast<double>(m);
          for_block(g, c0, c1, [&](int64_t c, int64_t o) {
            const double d = static_cast<double>(static_cast<float>(yp[o])) - s[c - c0];
            s2[c - c0] += d * d;
          });
        }
        for (int64_t c = c0; c < c1; ++c) {
          const double v = s2[c - c0] / static_cast<double>(m);
          mp[c] = static_cast<float>(s[c - c0]);
          vp[c] = static_cast<float>(v);
          rp[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(static_cast<float>(v)) + eps));
        }
      }
    });
  });
}

void bn_act_apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,
                  Tensor z) {
  check(y, "y");
  check(z, "z");
  const Geo g = geometry(y), gz = geometry(z);
  STD_TORCH_CHECK(g.sn == gz.sn && g.sc == gz.sc && g.shw == gz.shw && z.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_apply (CPU): z must have y's strides and dtype");
  for (auto* t : {&mean, &invstd, &weight, &bias}) check_channel(*t, g.c, "mean/invstd/weight/bias");
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = invstd.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const int64_t cb = channel_block(g);
  const int a = static_cast<int>(act);
  const float sl = static_cast<float>(slope);
  dispatch_float(y.scalar_type(), "y", [&]<typename T>() {
    const T* yp = y.const_data_ptr<T>();
    T* zp = z.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, (g.c + cb - 1) / cb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * cb, c1 = std::min(g.c, c0 + cb);
        if (apply_block(yp, zp, g, c0, c1, mp, rp, wp, bp, a, sl)) continue;
        for_block(g, c0, c1, [&](int64_t c, int64_t o) {
          const float scale = rp[c] * wp[c], shift = bp[c] - mp[c] * scale;
          zp[o] = static_cast<T>(bn_act(static_cast<float>(yp[o]) * scale + shift, a, sl));
        });
      }
    });
  });
}

void bn_act_backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act,
                     double slope, Tensor dy, Tensor sum_gx, Tensor sum_g) {
  check(y, "y");
  check(dz, "dz");
  check(dy, "dy");
  const Geo g = geometry(y), gd = geometry(dz), gy = geometry(dy);
  STD_TORCH_CHECK(g.sn == gy.sn && g.sc == gy.sc && g.shw == gy.shw && dy.scalar_type() == y.scalar_type(),
                  "fusedops_C::bn_act_backward (CPU): dy must have y's strides and dtype");
  STD_TORCH_CHECK(gd.n == g.n && gd.c == g.c && gd.hw == g.hw, "fusedops_C::bn_act_backward (CPU): dz shape");
  for (auto* t : {&mean, &invstd, &weight, &bias, &sum_gx, &sum_g})
    check_channel(*t, g.c, "mean/invstd/weight/bias/sums");
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = invstd.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* sgx = sum_gx.mutable_data_ptr<float>();
  float* sg = sum_g.mutable_data_ptr<float>();
  const int64_t cb = channel_block(g), m = g.n * g.hw;
  const int a = static_cast<int>(act);
  const float sl = static_cast<float>(slope);
  dispatch_float2(y.scalar_type(), "y", dz.scalar_type(), "dz", [&]<typename T, typename TD>() {
    const T* yp = y.const_data_ptr<T>();
    const TD* dzp = dz.const_data_ptr<TD>();
    T* dyp = dy.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, (g.c + cb - 1) / cb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> s1(cb), s2(cb);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * cb, c1 = std::min(g.c, c0 + cb);
        if (backward_block(yp, dzp, dyp, g, gd, c0, c1, mp, rp, wp, bp, a, sl, sg + c0, sgx + c0)) continue;
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t n = 0; n < g.n; ++n)
          for (int64_t p = 0; p < g.hw; ++p)
            for (int64_t c = c0; c < c1; ++c) {
              const float xhat = (static_cast<float>(yp[n * g.sn + c * g.sc + p * g.shw]) - mp[c]) * rp[c];
              const float gg = static_cast<float>(dzp[n * gd.sn + c * gd.sc + p * gd.shw]) *
                               bn_act_grad(xhat * wp[c] + bp[c], a, sl);
              s1[c - c0] += gg;
              s2[c - c0] += static_cast<double>(gg) * xhat;
            }
        for (int64_t c = c0; c < c1; ++c) {
          sg[c] = static_cast<float>(s1[c - c0]);
          sgx[c] = static_cast<float>(s2[c - c0]);
        }
        for (int64_t n = 0; n < g.n; ++n)
          for (int64_t p = 0; p < g.hw; ++p)
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t o = n * g.sn + c * g.sc + p * g.shw;
              const float xhat = (static_cast<float>(yp[o]) - mp[c]) * rp[c];
              const float gg = static_cast<float>(dzp[n * gd.sn + c * gd.sc + p * gd.shw]) *
                               bn_act_grad(xhat * wp[c] + bp[c], a, sl);
              const float mg = sg[c] / static_cast<float>(m), mgx = sgx[c] / static_cast<float>(m);
              dyp[o] = static_cast<T>(wp[c] * rp[c] * (gg - mg - xhat * mgx));
            }
      }
    });
  });
}

void bn_stats_running(Tensor y, double eps, double momentum, Tensor mean, Tensor invstd, Tensor var,
                      Tensor running_mean, Tensor running_var) {
  bn_stats(y, eps, mean, invstd, var);
  const Geo g = geometry(y);
  check_channel(running_mean, g.c, "running_mean");
  check_channel(running_var, g.c, "running_var");
  const int64_t m = g.n * g.hw;
  const float unbias = static_cast<float>(static_cast<double>(m) / static_cast<double>(std::max<int64_t>(m - 1, 1)));
  const float mom = static_cast<float>(momentum);
  const float* mp = mean.const_data_ptr<float>();
  const float* vp = var.const_data_ptr<float>();
  float* rm = running_mean.mutable_data_ptr<float>();
  float* rv = running_var.mutable_data_ptr<float>();
  for (int64_t c = 0; c < g.c; ++c) {
    rm[c] = bn_lerp(rm[c], mp[c], mom);
    rv[c] = bn_lerp(rv[c], vp[c] * unbias, mom);
  }
}

}  // namespace bn_cpu
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) {
  m.impl("bn_stats", TORCH_BOX(&fusedops::bn_cpu::bn_stats));
  m.impl("bn_stats_running", TORCH_BOX(&fusedops::bn_cpu::bn_stats_running));
  m.impl("bn_act_apply", TORCH_BOX(&fusedops::bn_cpu::bn_act_apply));
  m.impl("bn_act_backward", TORCH_BOX(&fusedops::bn_cpu::bn_act_backward));
}
