// Whether the CPU kernels take their AVX2 path in this process (vec_avx2.h): lets the tests
// check that FUSEDOPS_CPU_AVX2=0 did put them on the portable scalar loops.
#include "../common.h"
#include "vec_avx2.h"

namespace fusedops {
namespace {

bool cpu_vector_path(Tensor like) {
  (void)like;
#ifdef FUSEDOPS_HAVE_AVX2_PATH
  return avx2::available();
#else
  return false;
#endif
}

}  // namespace
}  // namespace fusedops

STABLE_TORCH_LIBRARY_FRAGMENT(fusedops_C, m) { m.def("cpu_vector_path(Tensor like) -> bool"); }

STABLE_TORCH_LIBRARY_IMPL(fusedops_C, CPU, m) { m.impl("cpu_vector_path", TORCH_BOX(&fusedops::cpu_vector_path)); }
