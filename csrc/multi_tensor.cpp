// foreach_table: the pointer/size table a Triton multi-tensor kernel reads, built here
// because a Python loop over hundreds of tensors costs more than the kernel it launches.
#include "multi_tensor.h"

namespace fusedops {
namespace {

// int64 [4, count + 1] on the CPU (pinned when `pin`): row 0 x addresses, row 1 y
// addresses, row 2 numels, row 3 the first block of each tensor (prefix sums). The last
// column holds: row 0 = 1 when every address is 16-byte aligned, row 3 = total blocks.
// Empty tensors are left out. A 0-element tensor when the lists are
// not plain (multi_tensor.h): the caller then takes its general path.
Tensor foreach_table(std::vector<Tensor> xs, std::vector<Tensor> ys, int64_t block_elems, bool pin) {
  STD_TORCH_CHECK(block_elems > 0, "fusedops_C::foreach_table: block must be positive");
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  if (!plain_pairs(xs, ys)) {
    return torch::stable::empty({0}, ScalarType::Long, std::nullopt, cpu);
  }
  int64_t count = 0;
  for (const auto& x : xs) count += x.numel() > 0;
  Tensor table = torch::stable::empty({4, count + 1}, ScalarType::Long, std::nullopt, cpu, pin);
  int64_t* row = table.mutable_data_ptr<int64_t>();
  const int64_t stride = count + 1;
  int64_t c = 0, blocks = 0;
  bool aligned = true;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t n = xs[i].numel();
    if (n == 0) continue;
    row[c] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(xs[i].data_ptr()));
    row[stride + c] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(ys[i].data_ptr()));
    row[2 * stride + c] = n;
    row[3 * stride + c] = blocks;
    aligned = aligned && row[c] % 16 == 0 && row[stride + c] % 16 == 0;
    blocks += (n + block_elems - 1) / block_elems;
    ++c;
  }
  row[count] = aligned ? 1 : 0;
  row[stride + count] = row[2 * stride + count] = 0;
  row[3 * stride + count] = blocks;
  return table;
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CompositeExplicitAutograd, m) {
  m.impl("foreach_table", TORCH_BOX(&fusedops::foreach_table));
}
