// The BatchNorm(+activation) kernels' host entry points of each device, for native code
// that calls them directly (csrc/convbn.cpp) instead of through the dispatcher. Arguments
// as the fusedops_C::bn_* schemas (csrc/batchnorm.cpp).
#pragma once

#include "common.h"

namespace fusedops {

#define FUSEDOPS_BN_ENTRY_POINTS                                                                                   \
  void stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var);                                        \
  void stats_running(Tensor y, double eps, double momentum, Tensor mean, Tensor invstd, Tensor var,                \
                     Tensor running_mean, Tensor running_var);                                                     \
  void apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,          \
             Tensor z);                                                                                            \
  void backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act,          \
                double slope, Tensor dy, Tensor sum_gx, Tensor sum_g);

namespace bn_cpu {
FUSEDOPS_BN_ENTRY_POINTS
}  // namespace bn_cpu

#ifdef USE_CUDA
namespace bn_cuda {
FUSEDOPS_BN_ENTRY_POINTS
}  // namespace bn_cuda
#endif

#undef FUSEDOPS_BN_ENTRY_POINTS

}  // namespace fusedops

// Defines namespace fusedops::NS's entry points as the file's bn_stats / bn_stats_running /
// bn_act_apply / bn_act_backward (used once by each device's kernel file).
#define FUSEDOPS_BN_DEFINE_ENTRY_POINTS(NS)                                                                     \
  namespace fusedops::NS {                                                                                     \
  void stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var) { bn_stats(y, eps, mean, invstd, var); } \
  void stats_running(Tensor y, double eps, double momentum, Tensor mean, Tensor invstd, Tensor var,            \
                     Tensor running_mean, Tensor running_var) {                                                \
    bn_stats_running(y, eps, momentum, mean, invstd, var, running_mean, running_var);                         \
  }                                                                                                            \
  void apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,      \
             Tensor z) {                                                                                       \
    bn_act_apply(y, mean, invstd, weight, bias, act, slope, z);                                                \
  }                                                                                                            \
  void backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act,      \
                double slope, Tensor dy, Tensor sum_gx, Tensor sum_g) {                                        \
    bn_act_backward(dz, y, mean, invstd, weight, bias, act, slope, dy, sum_gx, sum_g);                         \
  }                                                                                                            \
  }
