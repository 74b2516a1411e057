"""Kernels of the decode engine: Triton on a GPU, plain PyTorch on CPU.

* ``cache``: the paged KV-cache layout and ``reshape_and_cache`` (write new K/V into pages).
* ``paged_attention``: the split-KV paged-attention decode kernel.
* ``cpu``: the CPU backend, the same paged operations in plain PyTorch; the Triton kernels
  are tested against it.

Submodules import Triton; import them explicitly (``from kvpilot.worker.kernels import
paged_attention``) so that importing this package alone costs nothing.
"""
