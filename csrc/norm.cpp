// Schemas of the native LayerNorm / RMSNorm + activation kernels (csrc/cpu/norm.cpp,
// csrc/cuda/norm.cu). Absent optional tensors are passed as empty tensors with their
// has_* flag false. Layout: x, r, s, y, xs, dx are (M, N) with unit column stride and any
// row stride; dy and ds any strides; weight/bias (N,); mean/rstd fp32 (M,).
// act: 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu.
#include "common.h"

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) {
  // s = x + r (has_r), y = act(norm(s) * w + b); writes y, mean (LayerNorm), rstd, s.
  m.def("norm_act_fwd(Tensor x, Tensor r, Tensor(a!) s, Tensor(b!) y, Tensor w, Tensor b, Tensor(c!) mean, "
        "Tensor(d!) rstd, float eps, int act, bool rms, bool has_r, bool has_w, bool has_b) -> ()");
  // dx (+ ds) of one pass over (xs, dy); fp32 dW/dB partials, one row per chunk of rows
  // (P = dwp.size(0) chunks, fixed by the caller), summed by the caller in order.
  m.def("norm_act_bwd(Tensor dy, Tensor xs, Tensor w, Tensor b, Tensor mean, Tensor rstd, Tensor ds, "
        "Tensor(a!) dx, Tensor(b!) dwp, Tensor(c!) dbp, int act, bool rms, bool has_w, bool has_b, "
        "bool has_ds) -> ()");
}
