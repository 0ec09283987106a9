// Schemas of the 8-bit optimizer kernels, and the pointer table the Triton kernel reads.
#include "optim8bit_tensors.h"

namespace fusedops {
namespace optim8bit {
namespace {

// int64 [10, count + 1] on the CPU (pinned when `pin`), one column per non-empty tensor:
// rows p, g, state1, absmax1, state2, absmax2 addresses (0 where absent), numel, flags,
// first program (prefix sums, `blocks_per_program` quantization blocks per program). The
// last column's row 7 is 1 when every address is 16-byte aligned, its row 8 the total
// number of programs. Row 9: the tensor's position in the lists (stochastic rounding). `two`: kind has a second state.
Tensor optim8bit_table(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> state1,
                       std::vector<Tensor> absmax1, std::vector<Tensor> state2, std::vector<Tensor> absmax2,
                       bool two, int64_t blocks_per_program, bool pin) {
  STD_TORCH_CHECK(blocks_per_program > 0, "fusedops_C::optim8bit_table: blocks_per_program must be positive");
  const auto ts = collect(params, grads, state1, absmax1, state2, absmax2, two);
  const int64_t count = static_cast<int64_t>(ts.size()), stride = count + 1;
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  Tensor table = torch::stable::empty({10, stride}, ScalarType::Long, std::nullopt, cpu, pin);
  int64_t* row = table.mutable_data_ptr<int64_t>();
  auto addr = [](const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); };
  int64_t programs = 0;
  bool aligned = true;
  for (int64_t c = 0; c < count; ++c) {
    const StepTensor& t = ts[c];
    for (const void* ptr : {static_cast<const void*>(t.p), static_cast<const void*>(t.g), static_cast<const void*>(t.s1),
                            static_cast<const void*>(t.a1), static_cast<const void*>(t.s2),
                            static_cast<const void*>(t.a2)})
      aligned = aligned && addr(ptr) % 16 == 0;
    row[c] = addr(t.p);
    row[stride + c] = addr(t.g);
    row[2 * stride + c] = addr(t.s1);
    row[3 * stride + c] = addr(t.a1);
    row[4 * stride + c] = addr(t.s2);
    row[5 * stride + c] = addr(t.a2);
    row[6 * stride + c] = t.n;
    row[7 * stride + c] = t.flags;
    row[8 * stride + c] = programs;
    row[9 * stride + c] = t.index;
    programs += (blocks_of(t.n) + blocks_per_program - 1) / blocks_per_program;
  }
  for (int r = 0; r < 7; ++r) row[r * stride + count] = 0;
  row[7 * stride + count] = aligned ? 1 : 0;
  row[8 * stride + count] = programs;
  row[9 * stride + count] = 0;
  return table;
}

}  // namespace
}  // namespace optim8bit
}  // namespace fusedops

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) {
  // One step of an 8-bit optimizer (kind: 0 adamw, 1 adam, 2 lion, 3 sgd) over every
  // tensor of the lists, in one launch; states uint8 + fp32 absmax per 256 elements, or
  // fp32 with an empty absmax. Scalars are computed by fusedops (reference.optimizer_hyper).
  m.def("optim8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] absmax1, "
        "Tensor(d!)[] state2, Tensor(e!)[] absmax2, Tensor qmaps, int kind, float lr, float beta1, "
        "float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float weight_decay, float decay, "
        "float step_size, float inv_bc2_sqrt, bool first, bool nesterov, int sr_key) -> ()");
  // The step kernels' quantizer alone (a test hook): out[i] = code of the already
  // normalised x[i] (fp32) with the signed or the unsigned map's bucket table of qmaps.
  m.def("optim8bit_codes_(Tensor x, Tensor(a!) out, Tensor qmaps, bool signed) -> ()");
  m.def("optim8bit_table(Tensor[] params, Tensor[] grads, Tensor[] state1, Tensor[] absmax1, Tensor[] state2, "
        "Tensor[] absmax2, bool two, int blocks_per_program, bool pin) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CompositeExplicitAutograd, m) {
  m.impl("optim8bit_table", TORCH_BOX(&fusedops::optim8bit::optim8bit_table));
}
