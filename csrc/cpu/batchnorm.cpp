// BatchNorm(+activation) kernels on the CPU for a conv output y [N, C, H·W] (see
// csrc/batchnorm.cpp for the contract). Parallel over channel blocks; each channel is
// reduced sequentially in a fixed order (deterministic, whatever the thread count), with
// fp64 accumulators and an exact two-pass variance. Channels_last reads blocks of 16
// neighbouring channels per position; contiguous NCHW reads each channel's H·W run.
#include "../batchnorm_act.h"
#include "../batchnorm_kernels.h"
#include "../common.h"

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
        for_block(g, c0, c1, [&](int64_t c, int64_t o) { s[c - c0] += static_cast<float>(yp[o]); });
        for (int64_t c = c0; c < c1; ++c) s[c - c0] /= static_cast<double>(m);
        for_block(g, c0, c1, [&](int64_t c, int64_t o) {
          const double d = static_cast<double>(static_cast<float>(yp[o])) - s[c - c0];
          s2[c - c0] += d * d;
        });
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
