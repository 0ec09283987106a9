// Schemas of the native BatchNorm(+activation) kernels for fused Conv2d+BN+act (the
// public ops are fusedops::bn_stats / bn_act_apply / bn_act_backward, fusedops/ops/batchnorm.py).
//
// y, z, dz, dy are 4-D [N, C, H, W] whose H and W merge into one stride (stride(3) is the
// H·W stride): contiguous NCHW and channels_last qualify. mean, invstd, weight, bias and
// the sums are fp32 contiguous [C] (the caller passes ones/zeros for a missing affine).
// act: 0 identity, 1 relu, 2 relu6, 3 silu, 4 gelu, 5 gelu_tanh, 6 leaky_relu(slope).
#include "common.h"

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) {
  m.def("bn_stats(Tensor y, float eps, Tensor(a!) mean, Tensor(b!) invstd, Tensor(c!) var) -> ()");
  // bn_stats, then the running statistics updated as eager BatchNorm does (fused into the
  // finalize on CUDA): rm ← lerp(rm, μ, momentum), rv ← lerp(rv, σ²·M/(M−1), momentum).
  m.def("bn_stats_running(Tensor y, float eps, float momentum, Tensor(a!) mean, Tensor(b!) invstd, "
        "Tensor(c!) var, Tensor(d!) running_mean, Tensor(e!) running_var) -> ()");
  m.def("bn_act_apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int act, float slope, "
        "Tensor(a!) z) -> ()");
  m.def("bn_act_backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int act, "
        "float slope, Tensor(a!) dy, Tensor(b!) sum_gx, Tensor(c!) sum_g) -> ()");
}
