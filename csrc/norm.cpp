// Schemas of the native LayerNorm / RMSNorm + activation kernels (csrc/cpu/norm.cpp,
// csrc/cuda/norm.cu, csrc/cuda/norm_bwd.cu; host side: csrc/norm_ops.h). The ops allocate
// their outputs; tensors of any leading shape (rows over the last dim).
// act: 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu.
#include "common.h"

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) {
  // y = act(norm(s) * w + b), s = x (mode 0), x + r returned (mode 1) or x + r written into r
  // (mode 2). Returns (y, s, mean, rstd): y of dtype y_dtype (x's when None; float32, or
  // float16 / bfloat16 for a float32 x), s empty unless mode 1, mean (fp32, x.shape[:-1])
  // empty for RMSNorm (rms), rstd fp32.
  m.def("norm_act_fwd(Tensor x, Tensor(a!)? r, Tensor? w, Tensor? b, float eps, int act, bool rms, int mode, "
        "ScalarType? y_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // One pass over (s, dy): (dx (+ ds), dW, dB), dW / dB of the parameters' dtypes (empty when
  // absent) from fp32 partial rows summed per column in a fixed order; RMSNorm when mean is
  // absent.
  m.def("norm_act_bwd(Tensor dy, Tensor s, Tensor? w, Tensor? b, Tensor? mean, Tensor rstd, Tensor? ds, int act) "
        "-> (Tensor, Tensor, Tensor)");
}
