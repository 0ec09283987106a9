// The check every multi-tensor launch starts with: can these (x, y) pairs go to one
// launch as they are? Cheap enough to run on every call (a few shim calls per tensor),
// so the common case (gradient buffers: contiguous, one device, one dtype) needs no
// Python-side checks at all; anything else returns false and the caller's general
// path gives the precise error or splits the lists.
#pragma once

#include "common.h"

#include <algorithm>
#include <iterator>
#include <vector>

namespace fusedops {

struct ByteRange {
  uintptr_t begin, end;
  size_t pair;
};

// True when no two `written` ranges overlap and no `read` range overlaps a written one,
// except a read range that is exactly the written range of its own pair (an element read
// and then written by the same thread). Sorts `written`; give it non-empty ranges.
inline bool disjoint_ranges(std::vector<ByteRange>& written, const std::vector<ByteRange>& read) {
  std::sort(written.begin(), written.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < written.size(); ++k)
    if (written[k].begin < written[k - 1].end) return false;
  for (const ByteRange& r : read) {
    auto it = std::lower_bound(written.begin(), written.end(), r.end,
                               [](const ByteRange& w, uintptr_t v) { return w.begin < v; });
    if (it == written.begin()) continue;
    const ByteRange& w = *std::prev(it);
    if (w.end > r.begin && !(w.pair == r.pair && w.begin == r.begin && w.end == r.end)) return false;
  }
  return true;
}

// True when: equal lengths; every x and y defined, contiguous, of one device (that of
// xs[0]); every x of one kernel dtype and every y of one kernel dtype; each pair of equal
// shape; and no pair writes memory that another pair reads or writes (a y may be its own
// x exactly). Writes nothing.
inline bool plain_pairs(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys) {
  if (xs.size() != ys.size() || xs.empty()) return false;
  const auto tx = xs[0].scalar_type(), ty = ys[0].scalar_type();
  if (!is_kernel_float(tx) || !is_kernel_float(ty)) return false;
  const bool cuda = xs[0].is_cuda();
  if (!cuda && !xs[0].is_cpu()) return false;
  const int32_t device = xs[0].get_device_index();
  // a y may be exactly its own x only when both have one dtype (element i read, then written)
  const size_t no_pair = static_cast<size_t>(-1);
  std::vector<ByteRange> written, read;
  written.reserve(xs.size());
  read.reserve(ys.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    const Tensor& y = ys[i];
    if (!x.defined() || !y.defined()) return false;
    if (x.scalar_type() != tx || y.scalar_type() != ty) return false;
    if (x.is_cuda() != cuda || y.is_cuda() != cuda || (!cuda && !(x.is_cpu() && y.is_cpu()))) return false;
    if (x.get_device_index() != device || y.get_device_index() != device) return false;
    const auto xs_ = x.sizes(), ys_ = y.sizes();
    if (xs_.size() != ys_.size() || !std::equal(xs_.begin(), xs_.end(), ys_.begin())) return false;
    if (!x.is_contiguous() || !y.is_contiguous()) return false;
    const int64_t n = x.numel();
    if (n == 0) continue;
    const auto xb = reinterpret_cast<uintptr_t>(x.data_ptr());
    const auto yb = reinterpret_cast<uintptr_t>(y.data_ptr());
    written.push_back({xb, xb + static_cast<uintptr_t>(n) * x.element_size(), i});
    read.push_back({yb, yb + static_cast<uintptr_t>(n) * y.element_size(), tx == ty ? i : no_pair});
  }
  return disjoint_ranges(written, read);
}

}  // namespace fusedops
