// The fusedops._C module: declares the schemas of the native kernels. The kernels
// themselves are registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// These ops (namespace fusedops_C) are the implementation layer only: the public ops
// live in the `fusedops` namespace, are defined in Python (fusedops/ops), validate their
// arguments there and pick a backend (Triton, CUDA C++, C++ CPU, reference) per call.
#include <Python.h>

#include "common.h"

STABLE_TORCH_LIBRARY(fusedops_C, m) {
  // x += alpha * y. x contiguous; y contiguous with y.numel() dividing x.numel()
  // (y repeats along x's leading dims).
  m.def("add_(Tensor(a!) x, Tensor y, float alpha) -> ()");
  // xs[i] += alpha * ys[i] for every pair, in one launch. Returns false, writing nothing,
  // unless the lists are plain (multi_tensor.h).
  m.def("foreach_add_(Tensor(a!)[] xs, Tensor[] ys, float alpha) -> bool");
  // The pointer/size table of plain lists for a Triton multi-tensor kernel (multi_tensor.cpp).
  m.def("foreach_table(Tensor[] xs, Tensor[] ys, int block, bool pin) -> Tensor");
}

extern "C" {
// A bare module: importing it runs the static registrations above. It is written by
// hand (no pybind11) so that the extension can use the limited Python API (abi3).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
