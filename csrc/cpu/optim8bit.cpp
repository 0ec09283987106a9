// 8-bit optimizer step on the CPU: every tensor of the step in one parallel loop over
// quantization blocks. Per block of 256 elements: dequantize -> fp32 update -> absmax ->
// requantize (csrc/optim8bit.h holds the math, shared with the CUDA kernel).
#include "../optim8bit_tensors.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fusedops {
namespace optim8bit {
namespace {

constexpr int64_t kGrainBlocks = 16;  // quantization blocks per parallel task

// The bucket table of the signed / unsigned map inside qmaps (uint32 entries stored as fp32 bits).
const uint32_t* tables(const float* qm, bool is_signed) {
  return reinterpret_cast<const uint32_t*>(qm + (is_signed ? kSignedTable : kUnsignedTable));
}

// Normalise and quantize a block (csrc/optim8bit.h quantize: one bucket-table lookup).
void quantize_block(const float* x, int len, float absmax, const uint32_t* table, uint8_t* out) {
  for (int i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(quantize(normalise(x[i], absmax), table));
}

template <int64_t K, typename T>
void step_block(const StepTensor& t, int64_t b, const float* qm, const Hyper& h) {
  constexpr bool kTwo = K == kAdamW || K == kAdam;
  const int64_t begin = b * kQBlock;
  const int len = static_cast<int>(std::min<int64_t>(kQBlock, t.n - begin));
  T* p = static_cast<T*>(t.p) + begin;
  const T* g = static_cast<const T*>(t.g) + begin;
  float m[kQBlock], v[kQBlock];
  const bool f1 = t.flags & kState1F32, f2 = t.flags & kState2F32;
  if (f1) {
    const float* s = static_cast<const float*>(t.s1) + begin;
    for (int i = 0; i < len; ++i) m[i] = s[i];
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(t.s1) + begin;
    const float a = t.a1[b];
    for (int i = 0; i < len; ++i) m[i] = fmul(qm[kSignedCode + s[i]], a);
  }
  if constexpr (kTwo) {
    if (f2) {
      const float* s = static_cast<const float*>(t.s2) + begin;
      for (int i = 0; i < len; ++i) v[i] = s[i];
    } else {
      const uint8_t* s = static_cast<const uint8_t*>(t.s2) + begin;
      const float a = t.a2[b];
      for (int i = 0; i < len; ++i) v[i] = fmul(qm[kUnsignedCode + s[i]], a);
    }
  }
  float max1 = 0.f, max2 = 0.f;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const uint32_t key = kBf16 && h.sr ? sr_tensor_key(h.sr_key, t.index) : 0u;
  for (int i = 0; i < len; ++i) {
    float pi = static_cast<float>(p[i]);
    float vi = kTwo ? v[i] : 0.f;
    update<K>(pi, static_cast<float>(g[i]), m[i], vi, h);
    if (kBf16 && h.sr) pi = round_bf16_stochastic(pi, sr_bits(key, begin + i));
    p[i] = static_cast<T>(pi);
    max1 = std::max(max1, std::fabs(m[i]));
    if constexpr (kTwo) {
      v[i] = vi;
      max2 = std::max(max2, std::fabs(vi));
    }
  }
  if (f1) {
    float* s = static_cast<float*>(t.s1) + begin;
    for (int i = 0; i < len; ++i) s[i] = m[i];
  } else {
    quantize_block(m, len, max1, tables(qm, true), static_cast<uint8_t*>(t.s1) + begin);
    t.a1[b] = max1;
  }
  if constexpr (kTwo) {
    if (f2) {
      float* s = static_cast<float*>(t.s2) + begin;
      for (int i = 0; i < len; ++i) s[i] = v[i];
    } else {
      quantize_block(v, len, max2, tables(qm, false), static_cast<uint8_t*>(t.s2) + begin);
      t.a2[b] = max2;
    }
  }
}

template <int64_t K, typename T>
void run(const std::vector<StepTensor>& ts, const float* qm, const Hyper& h) {
  std::vector<int64_t> first{0};  // first block of each tensor (prefix sums)
  for (const auto& t : ts) first.push_back(first.back() + blocks_of(t.n));
  const int64_t total = first.back();
  if (total == 0) return;
  torch::stable::parallel_for(0, total, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      step_block<K, T>(ts[t], b - first[t], qm, h);
    }
  });
}

void optim8bit_step_(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> state1,
                     std::vector<Tensor> absmax1, std::vector<Tensor> state2, std::vector<Tensor> absmax2,
                     Tensor qmaps, int64_t kind, double lr, double beta1, double omb1, double beta2, double omb2,
                     double eps, double wd, double decay, double step_size, double inv_bc2_sqrt, bool first,
                     bool nesterov, int64_t sr_key) {
  STD_TORCH_CHECK(kind >= kAdamW && kind <= kSGD, "fusedops_C::optim8bit_step_: unknown kind ", kind);
  const bool two = kind == kAdamW || kind == kAdam;
  const auto ts = collect(params, grads, state1, absmax1, state2, absmax2, two);
  if (ts.empty()) return;
  STD_TORCH_CHECK(params[0].is_cpu(), "fusedops_C::optim8bit_step_ (CPU): params must be CPU tensors");
  STD_TORCH_CHECK(qmaps.is_cpu() && qmaps.scalar_type() == ScalarType::Float && qmaps.numel() == kQmapsNumel &&
                      qmaps.is_contiguous(),
                  "fusedops_C::optim8bit_step_: qmaps must be a contiguous float32 CPU tensor of ", kQmapsNumel, " elements");
  const float* qm = qmaps.const_data_ptr<float>();
  const Hyper h = make_hyper(lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt, first, nesterov, sr_key);
  dispatch_float(params[0].scalar_type(), "params", [&]<typename T>() {
    switch (kind) {
      case kAdamW: run<kAdamW, T>(ts, qm, h); break;
      case kAdam: run<kAdam, T>(ts, qm, h); break;
      case kLion: run<kLion, T>(ts, qm, h); break;
      default: run<kSGD, T>(ts, qm, h); break;
    }
  });
}

void optim8bit_codes_(Tensor x, Tensor out, Tensor qmaps, bool is_signed) {
  const int64_t n = check_codes(x, out, qmaps);
  STD_TORCH_CHECK(x.is_cpu(), "fusedops_C::optim8bit_codes_ (CPU): x must be a CPU tensor");
  const float* xs = x.const_data_ptr<float>();
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  const uint32_t* table = tables(qmaps.const_data_ptr<float>(), is_signed);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<uint8_t>(quantize(xs[i], table));
}

}  // namespace
}  // namespace optim8bit
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) {
  m.impl("optim8bit_step_", TORCH_BOX(&fusedops::optim8bit::optim8bit_step_));
  m.impl("optim8bit_codes_", TORCH_BOX(&fusedops::optim8bit::optim8bit_codes_));
}
