// The tensor lists of one 8-bit optimizer step, checked and flattened to a table of
// pointers and sizes (shared by the CPU kernel, the CUDA kernel and the Triton table).
#pragma once

#include "common.h"
#include "multi_tensor.h"
#include "optim8bit.h"

#include <vector>

namespace fusedops {
namespace optim8bit {

struct StepTensor {
  void* p;
  const void* g;
  void* s1;
  float* a1;
  void* s2;
  float* a2;
  int64_t n;
  int64_t flags;  // kState1F32 | kState2F32
  int64_t index;  // position in the step's lists (stochastic rounding's key)
};

inline int64_t blocks_of(int64_t n) { return (n + kQBlock - 1) / kQBlock; }

// Checks one state: uint8 codes with an fp32 absmax of ceil(n / 256) elements, or an fp32
// state with an empty absmax (32-bit state). Returns whether it is fp32.
inline bool check_state(const Tensor& s, const Tensor& a, const Tensor& p, const char* sname, const char* aname,
                        size_t i) {
  STD_TORCH_CHECK(s.is_contiguous() && a.is_contiguous(), "fusedops_C::optim8bit_step_: ", sname, "[", i,
                  "] and ", aname, "[", i, "] must be contiguous");
  STD_TORCH_CHECK(s.numel() == p.numel(), "fusedops_C::optim8bit_step_: ", sname, "[", i,
                  "] must have as many elements as params[", i, "]");
  STD_TORCH_CHECK(s.is_cuda() == p.is_cuda() && a.is_cuda() == p.is_cuda() &&
                      s.get_device_index() == p.get_device_index() && a.get_device_index() == p.get_device_index(),
                  "fusedops_C::optim8bit_step_: ", sname, "[", i, "] and ", aname, "[", i,
                  "] must be on the device of params[", i, "]");
  STD_TORCH_CHECK(a.scalar_type() == ScalarType::Float, "fusedops_C::optim8bit_step_: ", aname, "[", i,
                  "] must be float32");
  if (s.scalar_type() == ScalarType::Float) {
    STD_TORCH_CHECK(a.numel() == 0, "fusedops_C::optim8bit_step_: ", aname, "[", i,
                    "] must be empty for a float32 (32-bit) ", sname);
    return true;
  }
  STD_TORCH_CHECK(s.scalar_type() == ScalarType::Byte, "fusedops_C::optim8bit_step_: ", sname, "[", i,
                  "] must be uint8 (8-bit state) or float32 (32-bit state)");
  STD_TORCH_CHECK(a.numel() == blocks_of(p.numel()), "fusedops_C::optim8bit_step_: ", aname, "[", i,
                  "] must have ceil(numel / 256) elements");
  return false;
}

// The non-empty tensors of the step, in order. `two`: the kind has a second state.
inline std::vector<StepTensor> collect(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                                       const std::vector<Tensor>& state1, const std::vector<Tensor>& absmax1,
                                       const std::vector<Tensor>& state2, const std::vector<Tensor>& absmax2,
                                       bool two) {
  const size_t n = params.size();
  STD_TORCH_CHECK(grads.size() == n && state1.size() == n && absmax1.size() == n,
                  "fusedops_C::optim8bit_step_: params, grads, state1 and absmax1 must have equal lengths");
  STD_TORCH_CHECK(!two || (state2.size() == n && absmax2.size() == n),
                  "fusedops_C::optim8bit_step_: state2 and absmax2 must have one tensor per param");
  std::vector<StepTensor> out;
  out.reserve(n);
  if (n == 0) return out;
  const auto dtype = params[0].scalar_type();
  const bool cuda = params[0].is_cuda();
  const int32_t device = params[0].get_device_index();
  STD_TORCH_CHECK(is_kernel_float(dtype), "fusedops_C::optim8bit_step_: params must be float32, float16 or bfloat16");
  std::vector<ByteRange> written, read;  // what the step writes (params, states) and reads (grads)
  written.reserve(5 * n);
  read.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& g = grads[i];
    STD_TORCH_CHECK(p.scalar_type() == dtype && g.scalar_type() == dtype, "fusedops_C::optim8bit_step_: params[", i,
                    "] and grads[", i, "] must have the dtype of params[0]");
    STD_TORCH_CHECK(p.is_cuda() == cuda && g.is_cuda() == cuda && p.get_device_index() == device &&
                        g.get_device_index() == device,
                    "fusedops_C::optim8bit_step_: params[", i, "] and grads[", i, "] must be on the device of params[0]");
    STD_TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "fusedops_C::optim8bit_step_: params[", i,
                    "] and grads[", i, "] must be contiguous");
    const auto ps = p.sizes(), gs = g.sizes();
    STD_TORCH_CHECK(ps.size() == gs.size() && std::equal(ps.begin(), ps.end(), gs.begin()),
                    "fusedops_C::optim8bit_step_: grads[", i, "] must have the shape of params[", i, "]");
    int64_t flags = check_state(state1[i], absmax1[i], p, "state1", "absmax1", i) ? kState1F32 : 0;
    if (two) flags |= check_state(state2[i], absmax2[i], p, "state2", "absmax2", i) ? kState2F32 : 0;
    if (p.numel() == 0) continue;
    // empty tensors own no bytes; `pair` is i for params[i] and grads[i], n + i for states
    auto add = [](std::vector<ByteRange>& to, const Tensor& t, size_t pair) {
      if (t.numel() == 0) return;
      const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
      to.push_back({b, b + static_cast<uintptr_t>(t.numel()) * t.element_size(), pair});
    };
    add(written, p, i);
    add(written, state1[i], n + i);
    add(written, absmax1[i], n + i);
    if (two) {
      add(written, state2[i], n + i);
      add(written, absmax2[i], n + i);
    }
    add(read, g, i);
    out.push_back({p.data_ptr(), g.data_ptr(), state1[i].data_ptr(),
                   absmax1[i].numel() ? absmax1[i].mutable_data_ptr<float>() : nullptr,
                   two ? state2[i].data_ptr() : nullptr,
                   two && absmax2[i].numel() ? absmax2[i].mutable_data_ptr<float>() : nullptr, p.numel(), flags,
                   static_cast<int64_t>(i)});
  }
  STD_TORCH_CHECK(disjoint_ranges(written, read), "fusedops_C::optim8bit_step_: params and states must not "
                  "overlap each other, nor the grads (a grad may be exactly its own param)");
  return out;
}

// Checks of optim8bit_codes_ (the quantizer test hook); returns the number of elements.
inline int64_t check_codes(const Tensor& x, const Tensor& out, const Tensor& qmaps) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float && x.is_contiguous(),
                  "fusedops_C::optim8bit_codes_: x must be a contiguous float32 tensor");
  STD_TORCH_CHECK(out.scalar_type() == ScalarType::Byte && out.is_contiguous() && out.numel() == x.numel(),
                  "fusedops_C::optim8bit_codes_: out must be a contiguous uint8 tensor with the size of x");
  STD_TORCH_CHECK(qmaps.scalar_type() == ScalarType::Float && qmaps.is_contiguous() && qmaps.numel() == kQmapsNumel,
                  "fusedops_C::optim8bit_codes_: qmaps must be a contiguous float32 tensor of ", kQmapsNumel,
                  " elements");
  STD_TORCH_CHECK(x.is_cuda() == out.is_cuda() && x.is_cuda() == qmaps.is_cuda() &&
                      x.get_device_index() == out.get_device_index() &&
                      x.get_device_index() == qmaps.get_device_index(),
                  "fusedops_C::optim8bit_codes_: x, out and qmaps must be on one device");
  return x.numel();
}

// sr_key: the stochastic-rounding key of the step (0 .. 2^32 - 1), or -1 for round to nearest.
inline Hyper make_hyper(double lr, double beta1, double omb1, double beta2, double omb2, double eps, double wd,
                        double decay, double step_size, double inv_bc2_sqrt, bool first, bool nesterov, int64_t sr_key) {
  STD_TORCH_CHECK(sr_key >= -1 && sr_key < (int64_t{1} << 32),
                  "fusedops_C::optim8bit_step_: sr_key must be -1 or in [0, 2^32)");
  return {static_cast<float>(lr),    static_cast<float>(beta1), static_cast<float>(omb1),
          static_cast<float>(beta2), static_cast<float>(omb2),  static_cast<float>(eps),
          static_cast<float>(wd),    static_cast<float>(decay), static_cast<float>(step_size),
          static_cast<float>(inv_bc2_sqrt), first, nesterov, sr_key >= 0, static_cast<uint32_t>(sr_key < 0 ? 0 : sr_key)};
}

}  // namespace optim8bit
}  // namespace fusedops
