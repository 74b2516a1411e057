"""Reads that do nothing but read: the bounds decode kernels are measured against
(``benchmarks/decode_kernel.py``).

``stream_read``: one large contiguous tensor, the read-bandwidth ceiling. Each program
walks the tensor in blocks, ``num_programs x BLOCK`` elements apart, and sums what it
reads, so the compiler cannot drop the loads; one float32 per program is written.
Nothing else touches memory, so bytes read / time is as close to what the GPU can read as
a kernel gets. ``tma=True`` reads the same blocks as rows of a matrix copied by the
tensor-memory accelerator (Hopper and newer) instead of by the threads.

``paged_read``: the pages a decode call reads, in the decode's order and split: one
program per (sequence, KV head, split) walks its share of the sequence's pages through
the block table and sums them. It reads exactly the bytes the decode kernel reads (whole
pages) with none of its arithmetic: what reading the pages alone costs on a cache.
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


@triton.jit
def _paged_read_kernel(k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, num_splits,
                       stride_p, stride_t, stride_h, stride_bt,
                       PAGE_SIZE: tl.constexpr, PAGES: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_pages = tl.cdiv(tl.load(seq_lens_ptr + b), PAGE_SIZE)
    share = tl.cdiv(tl.cdiv(n_pages, PAGES), num_splits) * PAGES
    first = split * share
    last = tl.minimum(first + share, n_pages)
    full = tl.maximum(first, last - (last - first) % PAGES)  # steps before it are whole
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    rows = tl.arange(0, PAGES * PAGE_SIZE)
    slots = (rows % PAGE_SIZE) * stride_t + h * stride_h
    cols = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([PAGES * PAGE_SIZE, HEAD_DIM], dtype=tl.float32)
    # As in the decode: entries one step ahead, whole steps unmasked, the last masked.
    idx = first + rows // PAGE_SIZE
    pages = tl.load(bt_row + idx, mask=idx < last, other=0).to(tl.int64)
    for p0 in range(first, full, PAGES):
        nxt = p0 + PAGES + rows // PAGE_SIZE
        next_pages = tl.load(bt_row + nxt, mask=nxt < last, other=0).to(tl.int64)
        offs = (pages * stride_p + slots)[:, None] + cols[None, :]
        acc += tl.load(k_ptr + offs).to(tl.float32) + tl.load(v_ptr + offs).to(tl.float32)
        pages = next_pages
    if full < last:
        valid = (full + rows // PAGE_SIZE < last)[:, None]
        offs = (pages * stride_p + slots)[:, None] + cols[None, :]
        acc += tl.load(k_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * tl.num_programs(1) + h) * num_splits + split, tl.sum(acc))


def paged_read(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, out: torch.Tensor, *, num_splits: int = 1,
               pages_per_step: int = 4, num_warps: int = 4, num_stages: int = 3) -> None:
    """Read every page of every sequence (``cdiv(seq_lens[b], page_size)`` pages per KV
    head, whole) through ``block_table``, ``pages_per_step`` pages at a time; ``out``
    (float32, ``batch x kv_heads x num_splits``) gets each program's sum. Caches are laid
    out as for the decode kernel (``kvpilot.worker.kernels.cache``)."""
    batch, _ = block_table.shape
    _, page_size, kv_heads, head_dim = k_cache.shape
    if k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share dtype and layout")
    if out.dtype != torch.float32 or out.numel() != batch * kv_heads * num_splits:
        raise ValueError("out must be float32 with batch x kv_heads x num_splits elements")
    if page_size & (page_size - 1) or pages_per_step & (pages_per_step - 1):
        raise ValueError("page_size and pages_per_step must be powers of two")
    _paged_read_kernel[(batch, kv_heads, num_splits)](
        k_cache, v_cache, block_table, seq_lens, out, num_splits,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        PAGE_SIZE=page_size, PAGES=pages_per_step, HEAD_DIM=head_dim,
        num_warps=num_warps, num_stages=num_stages)
