// Shared helpers for the fusedops C++ / CUDA C++ kernels (LibTorch stable ABI).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>

namespace fusedops {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    default: return "an unsupported dtype";
  }
}

inline bool is_kernel_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Calls fn.template operator()<T>() with T the C++ type of one of the three storage
// dtypes every kernel supports (fp32, fp16, bf16). Math is always done in fp32.
template <typename Fn>
void dispatch_float(ScalarType t, const char* arg, Fn&& fn) {
  switch (t) {
    case ScalarType::Float: fn.template operator()<float>(); break;
    case ScalarType::Half: fn.template operator()<c10::Half>(); break;
    case ScalarType::BFloat16: fn.template operator()<c10::BFloat16>(); break;
    default:
      STD_TORCH_CHECK(false, "fusedops: ", arg, " must be float32, float16 or bfloat16, got ",
                      dtype_name(t));
  }
}

// Two storage dtypes at once (e.g. an in-place destination and a source of another dtype).
template <typename Fn>
void dispatch_float2(ScalarType a, const char* arg_a, ScalarType b, const char* arg_b, Fn&& fn) {
  dispatch_float(a, arg_a, [&]<typename A>() {
    dispatch_float(b, arg_b, [&]<typename B>() { fn.template operator()<A, B>(); });
  });
}

}  // namespace fusedops
