// Activation functors shared by the C++ CPU and CUDA C++ BatchNorm(+act) kernels.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FUSEDOPS_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPS_HD inline
#endif

namespace fusedops {

enum BnAct : int { kIdentity = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kGelu = 4, kGeluTanh = 5, kLeakyRelu = 6 };

// The activations that are piecewise linear (identity, ReLU, ReLU6, LeakyReLU). A kernel
// built with kSmooth = false computes these only: it carries no code for SiLU / GELU, and
// the CUDA kernels, which switch on the activation per element, are then much faster
// (bench/NOTES.md, round 25). Callers check bn_act_piecewise_linear before using it.
FUSEDOPS_HD bool bn_act_piecewise_linear(int act) {
  return act == kIdentity || act == kRelu || act == kRelu6 || act == kLeakyRelu;
}

template <bool kSmooth = true>
FUSEDOPS_HD float bn_act(float z, int act, float slope) {
  switch (act) {
    case kRelu: return z > 0.f ? z : 0.f;
    case kRelu6: return fminf(fmaxf(z, 0.f), 6.f);
    case kLeakyRelu: return z > 0.f ? z : z * slope;
    default: break;
  }
  if constexpr (kSmooth) {
    switch (act) {
      case kSilu: return z / (1.f + expf(-z));
      case kGelu: return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
      case kGeluTanh: {
        const float inner = 0.7978845608028654f * (z + 0.044715f * z * z * z);
        return 0.5f * z * (1.f + tanhf(inner));
      }
      default: break;
    }
  }
  return z;
}

// d act / dz at the pre-activation z, with eager's choices at the kinks.
template <bool kSmooth = true>
FUSEDOPS_HD float bn_act_grad(float z, int act, float slope) {
  switch (act) {
    case kRelu: return z > 0.f ? 1.f : 0.f;
    case kRelu6: return (z > 0.f && z < 6.f) ? 1.f : 0.f;
    case kLeakyRelu: return z > 0.f ? 1.f : slope;
    default: break;
  }
  if constexpr (kSmooth) {
    switch (act) {
      case kSilu: {
        const float s = 1.f / (1.f + expf(-z));
        return s * (1.f + z * (1.f - s));
      }
      case kGelu: {
        const float cdf = 0.5f * (1.f + erff(z * 0.7071067811865476f));
        return cdf + z * expf(-0.5f * z * z) * 0.3989422804014327f;
      }
      case kGeluTanh: {
        const float k = 0.7978845608028654f;
        const float t = tanhf(k * (z + 0.044715f * z * z * z));
        return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * z * z);
      }
      default: break;
    }
  }
  return 1.f;
}

// torch.lerp's formula (the running-statistics update of eager BatchNorm via _foreach_lerp_).
FUSEDOPS_HD float bn_lerp(float start, float end, float weight) {
  return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.f - weight);
}

}  // namespace fusedops
