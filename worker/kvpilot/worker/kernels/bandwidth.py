"""A streaming read of one large tensor: the read-bandwidth ceiling decode kernels are
measured against (``benchmarks/decode_kernel.py``).

Each program walks the tensor in blocks, ``num_programs x BLOCK`` elements apart, and
sums what it reads, so the compiler cannot drop the loads; one float32 per program is
written. Nothing else touches memory, so bytes read / time is as close to what the GPU
can read as a kernel gets. ``tma=True`` reads the same blocks as rows of a matrix copied by
the tensor-memory accelerator (Hopper and newer) instead of by the threads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, step):
        acc += tl.load(x_ptr + start + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _read_tma_kernel(desc, out_ptr, rows, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    for row in range(pid * BLOCK_M, rows, step):
        acc += desc.load([row, 0])
    tl.store(out_ptr + pid, tl.sum(acc))


TMA_WIDTH = 64  # float32 elements per row of the matrix view (256 bytes)


def stream_read(x: torch.Tensor, out: torch.Tensor, block: int = 4096, num_warps: int = 8,
                *, tma: bool = False, num_stages: int = 3) -> None:
    """Read all of ``x`` (contiguous float32, a multiple of ``block`` elements, fewer
    than 2**31) with ``out.numel()`` programs, each writing its partial sum to ``out``."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() % block:
        raise ValueError("x must be contiguous float32 with a multiple of block elements")
    if x.numel() >= 2**31:
        raise ValueError("x must have fewer than 2**31 elements")
    if not tma:
        _read_kernel[(out.numel(),)](x, out, x.numel(), BLOCK=block, num_warps=num_warps,
                                     num_stages=num_stages)
        return
    from triton.tools.tensor_descriptor import TensorDescriptor

    if block % TMA_WIDTH:
        raise ValueError(f"block must be a multiple of {TMA_WIDTH} to be read by rows")
    rows, block_m = x.numel() // TMA_WIDTH, block // TMA_WIDTH
    desc = TensorDescriptor(x, [rows, TMA_WIDTH], [TMA_WIDTH, 1], [block_m, TMA_WIDTH])
    _read_tma_kernel[(out.numel(),)](desc, out, rows, BLOCK_M=block_m, WIDTH=TMA_WIDTH,
                                     num_warps=num_warps, num_stages=num_stages)
