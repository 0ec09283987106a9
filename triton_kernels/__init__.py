"""Triton kernels of fusedops, one module per op family (installed as
fusedops.triton_kernels). Each module holds the @triton.jit kernels and the host
functions that launch them; they take tensors already validated and laid out by
fusedops.ops, and never import fusedops.nn."""
