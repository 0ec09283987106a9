// Host side of the LayerNorm / RMSNorm + activation ops shared by the CPU and CUDA
// kernels: the ops allocate their outputs and take tensors of any leading shape, so that a
// call from Python is one native call per direction (the hot path of small shapes is
// host-bound). Each device file supplies its 2-D kernel entry points (fwd, bwd), its
// number of dW/dB partial rows and its fixed-order sum of the partial rows.
#pragma once

#include "common.h"

#include <optional>
#include <tuple>
#include <type_traits>

namespace fusedops {
namespace norm {

// Calls fn.template operator()<kAct>() with the activation code as a constant (0 identity,
// 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 silu).
template <typename Fn>
void dispatch_act(int64_t act, Fn&& fn) {
  switch (act) {
    case 1: fn.template operator()<1>(); break;
    case 2: fn.template operator()<2>(); break;
    case 3: fn.template operator()<3>(); break;
    case 4: fn.template operator()<4>(); break;
    default: fn.template operator()<0>(); break;
  }
}

// 2-D t whose columns the kernels can step through with a unit stride: stride(1) == 1, or
// N == 1, where the column stride is never used (contiguous() leaves the stride of a size-1
// dimension as it is, e.g. torch.randn(1, M).t()).
inline bool unit_columns(const Tensor& t) { return t.stride(1) == 1 || t.size(1) == 1; }

// t as (M, N) rows with unit column stride (see unit_columns): t itself when 2-D, a view
// when the leading dims collapse, else one copy (t non-empty).
inline Tensor rows(const Tensor& t, int64_t n) {
  Tensor t2 = t.dim() == 2 ? t : torch::stable::reshape(t, {-1, n});
  return unit_columns(t2) || t2.numel() <= 1 ? t2 : torch::stable::contiguous(t2);
}

// t (any strides) as (M, N): t itself when 2-D, else a view when possible.
inline Tensor rows_any(const Tensor& t, int64_t n) {
  return t.dim() == 2 ? t : torch::stable::reshape(t, {-1, n});
}

// Per-row statistics as a contiguous (M,) fp32 vector.
inline Tensor flat(const Tensor& t) {
  Tensor t1 = t.dim() == 1 ? t : torch::stable::reshape(t, {-1});
  return t1.is_contiguous() ? t1 : torch::stable::contiguous(t1);
}

// The kernels take weight and bias of one dtype, x's or fp32: fp32 copies otherwise (exact
// for fp16/bf16 parameters; N elements).
inline void same_param_dtype(std::optional<Tensor>& w, std::optional<Tensor>& b, ScalarType xt) {
  const ScalarType wt = w ? w->scalar_type() : (b ? b->scalar_type() : xt);
  const bool mixed = (w && b && w->scalar_type() != b->scalar_type()) || (wt != xt && wt != ScalarType::Float);
  if (!mixed) return;
  if (w) w = torch::stable::to(*w, ScalarType::Float);
  if (b) b = torch::stable::to(*b, ScalarType::Float);
}

inline void check_param(const std::optional<Tensor>& p, const char* name, const Tensor& x, int64_t n) {
  if (!p) return;
  STD_TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "fusedops_C norm: ", name, " must have shape (", n, ",)");
  STD_TORCH_CHECK(p->get_device_index() == x.get_device_index() && p->is_cpu() == x.is_cpu(),
                  "fusedops_C norm: ", name, " must be on x's device");
  STD_TORCH_CHECK(is_kernel_float(p->scalar_type()), "fusedops_C norm: ", name,
                  " must be float32, float16 or bfloat16");
}

// The shape of an absent output.
inline constexpr int64_t kZero = 0;
inline const torch::headeronly::IntHeaderOnlyArrayRef kEmpty(kZero);

// The output dtypes the kernels write (y in the forward, dy read in the backward) for an x
// (or s) of dtype xt: xt; fp32 (eager's output under CUDA autocast for a 16-bit x); or
// fp16 / bf16 for an fp32 x (a consumer that casts to the autocast dtype anyway, e.g. an
// nn.Linear under autocast: the same values, rounded once).
inline bool out_dtype_ok(ScalarType xt, ScalarType yt) {
  return yt == xt || yt == ScalarType::Float || (xt == ScalarType::Float && is_kernel_float(yt));
}

// Calls fn.template operator()<Y>() with Y the C++ type of an output dtype yt for x's C++
// type T (out_dtype_ok(xt, yt) checked by the caller: forward() and backward() below check
// y's, dy's and ds's dtypes once for every device's 2-D kernel).
template <typename T, typename Fn>
void dispatch_out(ScalarType yt, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    if (yt == ScalarType::Half) fn.template operator()<c10::Half>();
    else if (yt == ScalarType::BFloat16) fn.template operator()<c10::BFloat16>();
    else fn.template operator()<float>();
  } else {
    if (yt == ScalarType::Float) fn.template operator()<float>();
    else fn.template operator()<T>();
  }
}

// Residual modes of the forward.
constexpr int64_t kNoResidual = 0, kResidualOut = 1, kResidualInplace = 2;

// (y, s, mean, rstd): y of x's shape and of dtype y_dtype (x's when absent; see
// out_dtype_ok); s = x + r of x's shape for kResidualOut (else empty); s written into r for
// kResidualInplace; mean (fp32, x.shape[:-1]; empty for RMSNorm) and rstd (fp32,
// x.shape[:-1]).
// fwd(x2, r2, s2, y2, w, b, mean1, rstd1, eps, act, rms, has_r, has_w, has_b): the 2-D kernel.
template <typename Fwd>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(Fwd&& fwd, const Tensor& x, const std::optional<Tensor>& r,
                                                   std::optional<Tensor> w, std::optional<Tensor> b, double eps,
                                                   int64_t act, bool rms, int64_t mode,
                                                   std::optional<ScalarType> y_dtype) {
  STD_TORCH_CHECK(x.dim() >= 1, "fusedops_C::norm_act_fwd: x must have at least one dimension");
  STD_TORCH_CHECK(mode >= kNoResidual && mode <= kResidualInplace, "fusedops_C::norm_act_fwd: bad mode ", mode);
  STD_TORCH_CHECK(mode == kNoResidual || (r && r->dim() == x.dim() && r->numel() == x.numel() &&
                                          r->scalar_type() == x.scalar_type()),
                  "fusedops_C::norm_act_fwd: the residual must match x's shape and dtype");
  const ScalarType xt = x.scalar_type(), yt = y_dtype.value_or(xt);
  STD_TORCH_CHECK(out_dtype_ok(xt, yt), "fusedops_C::norm_act_fwd: y_dtype must be x's dtype or float32, or float16 / "
                  "bfloat16 for a float32 x");
  const int64_t d = x.dim(), n = x.size(d - 1);
  check_param(w, "weight", x, n);
  check_param(b, "bias", x, n);
  const auto shape = x.sizes();
  const auto lead = shape.slice(0, static_cast<size_t>(d - 1));
  Tensor y = torch::stable::new_empty(x, shape, yt);
  Tensor rstd = torch::stable::new_empty(x, lead, ScalarType::Float);
  Tensor mean = torch::stable::new_empty(x, rms ? kEmpty : lead, ScalarType::Float);
  Tensor s = torch::stable::new_empty(x, mode == kResidualOut ? shape : kEmpty);
  if (x.numel() == 0) return {y, s, mean, rstd};
  same_param_dtype(w, b, xt);
  const Tensor x2 = rows(x, n);
  const bool flat_out = d == 2;  // no views on the 2-D (hot) path
  const Tensor y2 = flat_out ? y : torch::stable::view(y, {-1, n});
  const Tensor rstd1 = flat_out ? rstd : torch::stable::view(rstd, {-1});
  const Tensor mean1 = rms || flat_out ? mean : torch::stable::view(mean, {-1});
  Tensor r2 = x2, s2 = x2;  // placeholders when there is no residual (has_r false)
  bool copy_back = false;
  if (mode != kNoResidual) {
    r2 = rows(*r, n);
    if (mode == kResidualOut) {
      s2 = flat_out ? s : torch::stable::view(s, {-1, n});
    } else {  // into the residual's own rows, or into a copy written back once
      s2 = r2;
      copy_back = r2.data_ptr() != r->data_ptr();
    }
  }
  fwd(x2, r2, s2, y2, w ? *w : x2, b ? *b : x2, mean1, rstd1, eps, act, rms, mode != kNoResidual, w.has_value(),
      b.has_value());
  if (copy_back) {
    Tensor dst = *r;
    torch::stable::copy_(dst, torch::stable::view(s2, r->sizes()));
  }
  return {y, s, mean, rstd};
}

// (dx, dw, db): dx of s's shape and dtype (= dresidual when ds is given), dw / db of the
// parameters' dtypes (empty when absent), from fp32 partial rows summed in a fixed order.
// programs(m, n, s, dy): the number of partial rows; bwd(dy2, s2, w, b, mean1, rstd1, ds2, dx2,
// dwp, dbp, act, rms, has_w, has_b, has_ds): the 2-D kernel; finish(dwp, dw, sum_w, dbp, db,
// sum_b, p, n): sums the (P, N) fp32 partial rows column by column in row order into dW
// (sum_w) and dB (sum_b), (N,) of the parameters' dtypes.
template <typename Programs, typename Bwd, typename Finish>
std::tuple<Tensor, Tensor, Tensor> backward(Programs&& programs, Bwd&& bwd, Finish&& finish, const Tensor& dy,
                                            const Tensor& s, const std::optional<Tensor>& weight,
                                            const std::optional<Tensor>& bias, const std::optional<Tensor>& mean,
                                            const Tensor& rstd, const std::optional<Tensor>& ds, int64_t act) {
  STD_TORCH_CHECK(s.dim() >= 1, "fusedops_C::norm_act_bwd: s must have at least one dimension");
  STD_TORCH_CHECK(dy.dim() == s.dim() && dy.numel() == s.numel() && (!ds || ds->numel() == s.numel()),
                  "fusedops_C::norm_act_bwd: dy and ds must have s's shape");
  const int64_t d = s.dim(), n = s.size(d - 1), m = n == 0 ? 0 : s.numel() / n;
  check_param(weight, "weight", s, n);
  check_param(bias, "bias", s, n);
  STD_TORCH_CHECK(out_dtype_ok(s.scalar_type(), dy.scalar_type()),
                  "fusedops_C::norm_act_bwd: dy must have s's dtype or float32, or float16 / bfloat16 for a float32 s");
  STD_TORCH_CHECK(!ds || ds->scalar_type() == s.scalar_type(), "fusedops_C::norm_act_bwd: ds must have s's dtype");
  const bool rms = !mean.has_value(), has_w = weight.has_value(), has_b = bias.has_value();
  Tensor dx = torch::stable::new_empty(s, s.sizes());
  Tensor dw = torch::stable::new_empty(s, has_w ? torch::headeronly::IntHeaderOnlyArrayRef(n) : kEmpty,
                                       has_w ? weight->scalar_type() : s.scalar_type());
  Tensor db = torch::stable::new_empty(s, has_b ? torch::headeronly::IntHeaderOnlyArrayRef(n) : kEmpty,
                                       has_b ? bias->scalar_type() : s.scalar_type());
  if (m == 0) {  // no rows: zero gradients of the parameters
    if (has_w) torch::stable::zero_(dw);
    if (has_b) torch::stable::zero_(db);
    return {dx, dw, db};
  }
  std::optional<Tensor> w = weight, b = bias;
  same_param_dtype(w, b, s.scalar_type());
  const int64_t p = (has_w || has_b) ? programs(m, n, s, dy) : 1;
  // One partial row of fp32 parameters: the kernel writes dW / dB directly.
  const auto partials = [&](bool has, Tensor& out) -> Tensor {
    if (!has) return s;  // placeholder (has_* false)
    if (p == 1 && out.scalar_type() == ScalarType::Float) return torch::stable::view(out, {1, n});
    return torch::stable::new_empty(s, {p, n}, ScalarType::Float);
  };
  Tensor dwp = partials(has_w, dw), dbp = partials(has_b, db);
  const bool flat_in = d == 2;
  const Tensor s2 = rows(s, n);
  const Tensor dy2 = rows_any(dy, n);
  const Tensor ds2 = ds ? rows_any(*ds, n) : s2;
  const Tensor dx2 = flat_in ? dx : torch::stable::view(dx, {-1, n});
  const Tensor rstd1 = flat(rstd);
  const Tensor mean1 = rms ? rstd1 : flat(*mean);
  bwd(dy2, s2, w ? *w : s2, b ? *b : s2, mean1, rstd1, ds2, dx2, dwp, dbp, act, rms, has_w, has_b, ds.has_value());
  const bool sum_w = has_w && dwp.data_ptr() != dw.data_ptr(), sum_b = has_b && dbp.data_ptr() != db.data_ptr();
  if (sum_w || sum_b) finish(dwp, dw, sum_w, dbp, db, sum_b, p, n);
  return {dx, dw, db};
}

}  // namespace norm
}  // namespace fusedops
