"""Triton kernels of the decode engine, each with a plain PyTorch reference.

* ``cache``: the paged KV-cache layout and ``reshape_and_cache`` (write new K/V into pages).
* ``paged_attention``: the split-KV paged-attention decode kernel.
* ``reference``: the same operations in plain PyTorch, the ground truth for tests.

Submodules import Triton; import them explicitly (``from kvpilot.worker.kernels import
paged_attention``) so that importing this package alone costs nothing.
"""
