// The training step of fused Conv2d + BatchNorm2d(+act) as one native call per direction
// (fusedops/nn_convbn.py, `_ConvBNActTrain`): the convolutions go through the dispatcher
// (aten::convolution / aten::convolution_backward, i.e. cuDNN on CUDA), the BatchNorm
// kernels through fusedops_C::bn_stats(_running) / bn_act_apply / bn_act_backward of the
// tensors' device, called directly (csrc/batchnorm_kernels.h). One call replaces the Python glue between those ops (host time: the
// step of a small conv block is bound by it).
//
// weight and bias are fp32 contiguous [C] (the caller passes ones / zeros for a missing
// affine); running_mean / running_var fp32 contiguous [C] or absent. The conv output y is
// read as [N, C, H·W] with one stride for H·W (dense NCHW and channels_last qualify; any
// other layout is copied to contiguous NCHW first).
#include "batchnorm_kernels.h"
#include "common.h"

#include <array>
#include <optional>
#include <tuple>
#include <vector>

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) {
  // y = conv2d(x, w) (no bias); batch statistics of y (and the running statistics updated
  // as eager BatchNorm does when running_mean / running_var are given); z = act(BN(y)).
  // Returns (z, mean, invstd, var, y).
  m.def("conv_bn_act_fwd(Tensor x, Tensor w, int[] stride, int[] padding, int[] dilation, int groups, float eps, "
        "Tensor weight, Tensor bias, int act, float slope, float momentum, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward of conv_bn_act_fwd with batch statistics. y: the forward's conv output, or
  // absent: recomputed from x and w (dy is then written over it). mask: 1 dX, 2 dW, 4 split
  // (dX left to the caller, who releases x first: dy is returned for it). Returns
  // (dy if split, dx if asked and not split, dw if asked, dgamma = sum(g·ŷ), dbeta = sum(g)),
  // the last two fp32 [C]; an output not asked for is None (nothing allocated).
  m.def("conv_bn_act_bwd(Tensor dz, Tensor x, Tensor w, Tensor? y, int[] stride, int[] padding, int[] dilation, "
        "int groups, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int act, float slope, int mask) "
        "-> (Tensor?, Tensor?, Tensor?, Tensor, Tensor)");
  // The forward torch.compile traces (fusedops/ops/convbn.py registers its fake and autograd
  // formula, whose backward is conv_bn_act_bwd): conv_bn_act_fwd without running statistics
  // (the compiled graph updates them) and nothing mutated; y is returned only when keep_y,
  // else an empty tensor, so that the compiled graph cannot keep the conv output.
  m.def("conv_bn_act_train(Tensor x, Tensor w, int[] stride, int[] padding, int[] dilation, int groups, float eps, "
        "Tensor weight, Tensor bias, int act, float slope, bool keep_y) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace fusedops {
namespace {

using torch::stable::detail::from;
using torch::stable::detail::to;
using IntList = std::vector<int64_t>;

template <size_t N>
void call(const char* op, std::array<StableIValue, N>& stack) {
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION));
}

// y can be read as [N, C, H·W]: stride(3) is the stride of the merged H·W dimension.
bool hw_mergeable(const Tensor& t) {
  const int64_t h = t.size(2), w = t.size(3);
  if (h == 1) return true;
  if (w == 1) return t.stride(2) == t.stride(3);
  return t.stride(2) == w * t.stride(3);
}

Tensor hw_ready(Tensor t) { return hw_mergeable(t) ? t : torch::stable::contiguous(t); }

bool same_strides(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < 4; ++d)
    if (a.stride(d) != b.stride(d)) return false;
  return true;
}

// An output the kernels write with y's strides: empty_like(y) has them where y is dense; a
// y that is not (a slice passed as the saved y) is first copied to contiguous NCHW.
Tensor out_like_y(Tensor& y) {
  Tensor out = torch::stable::empty_like(y);
  if (same_strides(out, y)) return out;
  y = torch::stable::contiguous(y);
  return torch::stable::empty_like(y);
}

Tensor conv(const Tensor& x, const Tensor& w, const IntList& stride, const IntList& padding, const IntList& dilation,
            int64_t groups) {
  std::array<StableIValue, 9> s{from(x),       from(w),     from(std::nullopt), from(stride),
                                from(padding), from(dilation), from(false),     from(IntList{0, 0}),
                                from(groups)};
  call("aten::convolution", s);
  return to<Tensor>(s[0]);
}

// The BN kernels of t's device.
struct BnKernels {
  decltype(&bn_cpu::bn_stats) stats;
  decltype(&bn_cpu::bn_stats_running) stats_running;
  decltype(&bn_cpu::bn_act_apply) apply;
  decltype(&bn_cpu::bn_act_backward) backward;
};

const BnKernels& bn_kernels(const Tensor& t) {
  static const BnKernels cpu{&bn_cpu::bn_stats, &bn_cpu::bn_stats_running, &bn_cpu::bn_act_apply,
                            &bn_cpu::bn_act_backward};
  if (t.is_cpu()) return cpu;
#ifdef USE_CUDA
  static const BnKernels cuda{&bn_cuda::bn_stats, &bn_cuda::bn_stats_running, &bn_cuda::bn_act_apply,
                             &bn_cuda::bn_act_backward};
  if (t.is_cuda()) return cuda;
#endif
  STD_TORCH_CHECK(false, "fusedops_C conv + BN: no BatchNorm kernels for this device in this build");
  return cpu;
}

Tensor channels(const Tensor& like, int64_t c) { return torch::stable::new_empty(like, {c}, ScalarType::Float); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_act_fwd(
    Tensor x, Tensor w, IntList stride, IntList padding, IntList dilation, int64_t groups, double eps, Tensor weight,
    Tensor bias, int64_t act, double slope, double momentum, std::optional<Tensor> running_mean,
    std::optional<Tensor> running_var) {
  STD_TORCH_CHECK(x.dim() == 4, "fusedops_C::conv_bn_act_fwd: x must be 4-D [N, C, H, W]");
  STD_TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
                  "fusedops_C::conv_bn_act_fwd: running_mean and running_var come together");
  Tensor y = hw_ready(conv(x, w, stride, padding, dilation, groups));
  const int64_t c = y.size(1);
  STD_TORCH_CHECK(y.size(0) * y.size(2) * y.size(3) > 1,
                  "fusedops_C::conv_bn_act_fwd: expected more than 1 value per channel when training");
  const BnKernels& k = bn_kernels(y);
  Tensor mean = channels(y, c), invstd = channels(y, c), var = channels(y, c);
  if (running_mean.has_value()) {
    k.stats_running(y, eps, momentum, mean, invstd, var, *running_mean, *running_var);
  } else {
    k.stats(y, eps, mean, invstd, var);
  }
  Tensor z = out_like_y(y);  // y (the conv's output) is dense: z gets its strides
  k.apply(y, mean, invstd, weight, bias, act, slope, z);
  return {z, mean, invstd, var, y};
}

std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>, Tensor, Tensor> conv_bn_act_bwd(
    Tensor dz, Tensor x, Tensor w, std::optional<Tensor> y_saved, IntList stride, IntList padding, IntList dilation,
    int64_t groups, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope, int64_t mask) {
  STD_TORCH_CHECK(x.dim() == 4 && dz.dim() == 4, "fusedops_C::conv_bn_act_bwd: x and dz must be 4-D");
  const bool need_dx = mask & 1, need_dw = mask & 2, split = mask & 4;
  const bool recompute = !y_saved.has_value();
  Tensor y = recompute ? hw_ready(conv(x, w, stride, padding, dilation, groups)) : hw_ready(*y_saved);
  const int64_t c = y.size(1);
  STD_TORCH_CHECK(dz.size(0) == y.size(0) && dz.size(1) == c && dz.size(2) == y.size(2) && dz.size(3) == y.size(3),
                  "fusedops_C::conv_bn_act_bwd: dz must have the conv output's shape");
  // the recomputed y is this call's own: the kernels read each element of y before they
  // write dy there
  Tensor dy = recompute ? y : out_like_y(y);
  Tensor sum_gx = channels(y, c), sum_g = channels(y, c);
  bn_kernels(y).backward(hw_ready(dz), y, mean, invstd, weight, bias, act, slope, dy, sum_gx, sum_g);
  std::optional<Tensor> dx, dw;
  const std::array<bool, 3> out{need_dx && !split, need_dw, false};
  if (out[0] || out[1]) {
    std::array<StableIValue, 11> s{
        from(dy),      from(x),        from(w),     from(std::nullopt), from(stride),
        from(padding), from(dilation), from(false), from(IntList{0, 0}), from(groups),
        from(torch::headeronly::HeaderOnlyArrayRef<bool>(out.data(), out.size()))};
    call("aten::convolution_backward", s);
    Tensor grads[3] = {to<Tensor>(s[0]), to<Tensor>(s[1]), to<Tensor>(s[2])};  // owns all three
    if (out[0]) dx = grads[0];
    if (out[1]) dw = grads[1];
  }
  std::optional<Tensor> dy_out;
  if (split) dy_out = dy;
  return {dy_out, dx, dw, sum_gx, sum_g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_act_train(Tensor x, Tensor w, IntList stride,
                                                                    IntList padding, IntList dilation, int64_t groups,
                                                                    double eps, Tensor weight, Tensor bias,
                                                                    int64_t act, double slope, bool keep_y) {
  auto [z, mean, invstd, var, y] = conv_bn_act_fwd(x, w, std::move(stride), std::move(padding), std::move(dilation),
                                                   groups, eps, weight, bias, act, slope, 0.0, std::nullopt,
                                                   std::nullopt);
  if (!keep_y) y = torch::stable::new_empty(x, {0});
  return {z, mean, invstd, var, y};
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CompositeExplicitAutograd, m) {
  m.impl("conv_bn_act_fwd", TORCH_BOX(&fusedops::conv_bn_act_fwd));
  m.impl("conv_bn_act_bwd", TORCH_BOX(&fusedops::conv_bn_act_bwd));
  m.impl("conv_bn_act_train", TORCH_BOX(&fusedops::conv_bn_act_train));
}
