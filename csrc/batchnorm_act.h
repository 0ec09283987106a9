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

// The activations that are piecewise linear (identity, ReLU, ReLU6, LeakyReLU).
FUSEDOPS_HD bool bn_act_piecewise_linear(int act) {
  return act == kIdentity || act == kRelu || act == kRelu6 || act == kLeakyRelu;
}

// What a kernel is built for (its kBuild): every activation, switched on per element
// (kAnyAct); the piecewise-linear ones, switched on (kPiecewise); or one smooth activation
// (kSilu, kGelu, kGeluTanh), with no switch. The CUDA kernels, which apply the activation
// per element, are much faster built for less (bench/NOTES.md, rounds 25–26).
constexpr int kAnyAct = -1;
constexpr int kPiecewise = -2;

FUSEDOPS_HD int bn_act_build(int act) { return bn_act_piecewise_linear(act) ? kPiecewise : act; }

template <int kBuild = kAnyAct>
FUSEDOPS_HD float bn_act(float z, int act, float slope) {
  if constexpr (kBuild == kSilu || kBuild == kAnyAct) {
    if (kBuild == kSilu || act == kSilu) return z / (1.f + expf(-z));
  }
  if constexpr (kBuild == kGelu || kBuild == kAnyAct) {
    if (kBuild == kGelu || act == kGelu) return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
  }
  if constexpr (kBuild == kGeluTanh || kBuild == kAnyAct) {
    if (kBuild == kGeluTanh || act == kGeluTanh) {
      const float inner = 0.7978845608028654f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(inner));
    }
  }
  if constexpr (kBuild == kAnyAct || kBuild == kPiecewise) {
    switch (act) {
      case kRelu: return z > 0.f ? z : 0.f;
      case kRelu6: return fminf(fmaxf(z, 0.f), 6.f);
      case kLeakyRelu: return z > 0.f ? z : z * slope;
      default: break;
    }
  }
  return z;
}

// d act / dz at the pre-activation z, with eager's choices at the kinks.
template <int kBuild = kAnyAct>
FUSEDOPS_HD float bn_act_grad(float z, int act, float slope) {
  if constexpr (kBuild == kSilu || kBuild == kAnyAct) {
    if (kBuild == kSilu || act == kSilu) {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
  }
  if constexpr (kBuild == kGelu || kBuild == kAnyAct) {
    if (kBuild == kGelu || act == kGelu) {
      const float cdf = 0.5f * (1.f + erff(z * 0.7071067811865476f));
      return cdf + z * expf(-0.5f * z * z) * 0.3989422804014327f;
    }
  }
  if constexpr (kBuild == kGeluTanh || kBuild == kAnyAct) {
    if (kBuild == kGeluTanh || act == kGeluTanh) {
      const float k = 0.7978845608028654f;
      const float t = tanhf(k * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * z * z);
    }
  }
  if constexpr (kBuild == kAnyAct || kBuild == kPiecewise) {
    switch (act) {
      case kRelu: return z > 0.f ? 1.f : 0.f;
      case kRelu6: return (z > 0.f && z < 6.f) ? 1.f : 0.f;
      case kLeakyRelu: return z > 0.f ? 1.f : slope;
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
