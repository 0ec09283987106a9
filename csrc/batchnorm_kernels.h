// The BatchNorm(+activation) kernels' host entry points of each device: registered as the
// fusedops_C::bn_* ops (csrc/batchnorm.cpp has their schemas) and called directly by native
// code (csrc/convbn.cpp) without a dispatcher round trip.
#pragma once

#include "common.h"

#define FUSEDOPS_BN_ENTRY_POINTS                                                                                   \
  void bn_stats(Tensor y, double eps, Tensor mean, Tensor invstd, Tensor var);                                     \
  void bn_stats_running(Tensor y, double eps, double momentum, Tensor mean, Tensor invstd, Tensor var,             \
                        Tensor running_mean, Tensor running_var);                                                  \
  void bn_act_apply(Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act, double slope,   \
                    Tensor z);                                                                                     \
  void bn_act_backward(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int64_t act,   \
                       double slope, Tensor dy, Tensor sum_gx, Tensor sum_g);

namespace fusedops {
namespace bn_cpu {
FUSEDOPS_BN_ENTRY_POINTS
}  // namespace bn_cpu
#ifdef USE_CUDA
namespace bn_cuda {
FUSEDOPS_BN_ENTRY_POINTS
}  // namespace bn_cuda
#endif
}  // namespace fusedops

#undef FUSEDOPS_BN_ENTRY_POINTS
