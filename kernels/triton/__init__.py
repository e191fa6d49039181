"""Triton kernels (imported lazily by ``ops.py`` when a CUDA tensor reaches an op)."""
