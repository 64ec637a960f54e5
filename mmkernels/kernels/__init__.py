"""Triton kernels and their launch helpers (no autograd, no modules)."""
