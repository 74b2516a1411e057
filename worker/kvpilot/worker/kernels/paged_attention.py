"""Paged-attention decode: one query token per sequence against its paged KV cache.

Why this kernel looks the way it does
    A decode step reads every cached K and V byte of every sequence once and does two
    small matrix-vector products with them, so it is bound by memory bandwidth: the
    figure of merit is KV bytes read per second against what the GPU can read at all
    (``benchmarks/decode_kernel.py``, ``docs/worker.md``). Everything below serves
    keeping enough bytes in flight and reading each one once.

Layout (``kvpilot.worker.kernels.cache``)
    K and V pages are logically ``[num_pages, page_size, kv_heads, head_dim]``; the
    kernel takes the three outer strides as arguments, so token-major and head-major
    pages both work. ``block_table[b, i]`` is the page of tokens ``i*page_size ..``
    of sequence ``b``; ``seq_lens[b]`` how many are valid.

Work split
    One program owns one (sequence, KV head, split). It loads the ``GROUP =
    q_heads / kv_heads`` query heads that share the KV head as the rows of one
    ``[BLOCK_G, head_dim]`` tile (padded to at least 16 rows for the tensor cores), so
    each K/V tile is loaded once for the whole group (GQA packing) and goes through
    ``tl.dot``: ``S = Q K^T`` then ``O += P V``, with an fp32 online softmax (running max
    and sum, base-2 exponentials with ``log2(e)`` folded into the scale).

    With ``swap`` the two products run transposed, ``S^T = K Q^T`` and ``O^T += V^T
    P^T``: the tile's tokens and ``head_dim`` are then the 64-row side of the
    tensor-core product and the group's few heads its narrow side, which on Hopper lets
    four warps issue one warpgroup MMA per product straight from the tile in shared
    memory. The default takes it on Hopper under a quarter (sequence, KV head) unit per
    SM (measured: docs/worker.md, "Decode kernel"). The partial last tile of
    a range always goes unswapped (``_paged_decode_kernel``).

    Per tile of ``BLOCK_N`` tokens the kernel turns token positions into
    ``(block_table[pos // page_size], pos % page_size)`` and gathers rows of ``head_dim``
    contiguous elements; any page size from 1 to 128 works because the tile never
    assumes that a page holds a whole tile. A head_dim that is not a power of two (80,
    96) is padded to the next one (``BLOCK_D``): the padded columns of Q, K and V are
    loaded as 0 and never stored, so ``Q K^T`` is unchanged and ``P V``'s extra columns
    are dropped.

Keeping bytes in flight
    The block-table entries of the next tile are loaded one iteration ahead. Without
    that, the K/V addresses of a tile depend on a load of the same iteration, and
    Triton's software pipeliner then keeps a single K/V buffer: one tile in flight per
    program. With the entries carried over from the previous iteration the loads are
    pipelined ``num_stages - 1`` tiles deep. All tiles but the last of a range are
    whole, and run without masks; only the last is masked (and reads masked tokens as
    0, so stale slots never reach the products).

Split-KV (flash-decoding)
    ``batch x kv_heads`` programs are too few to fill 132 SMs when the batch is small
    (8 programs for one Llama-3-8B sequence), and then the read rate is that of a few
    SMs, not of the memory. So the sequence is cut into ``num_splits`` ranges of whole
    tiles; each program writes its range's normalized partial output and its
    log-sum-exp (base 2), and a second kernel merges the splits of each query head in
    one pass with weights ``2^(lse_s - max lse)``. Beyond 16 splits each merge program
    loads every split of a 16-wide slice of the head at once, so its loads form no
    chain.
    On Hopper and later the merge is launched with programmatic dependent launch: the
    decode programs let it be scheduled as they start, and it waits in the kernel for
    the decode grid to finish, so its launch overlaps the decode.

    How many splits: programs of equal length run in waves of as many as fit on the GPU
    at once (SMs x programs per SM, the latter asked of the CUDA driver for the compiled
    kernel after its first launch), and a second, partly filled wave costs nearly a
    whole one. ``choose_num_splits`` therefore takes the largest count that keeps every
    program in one wave, 1 when the batch alone fills the GPU, and never a split
    shorter than ``min_tiles`` tiles. It needs an upper bound of the sequence lengths,
    by default what the block table can hold, so the host never waits on the device.
    With one split the kernel normalizes and writes the output itself (no second
    launch). Sequence lengths are read from device memory and the split count is a
    runtime argument (not specialized), so new lengths and split counts never compile a
    new kernel; only the page size, head dim, group size, dtypes, launch shape and
    whether there are splits at all do.

    A split can be empty (a sequence shorter than the longest one of the batch): it
    writes ``lse = -inf`` and a zero partial, and the merge gives such splits weight 0
    and a sequence with no tokens at all an output of 0, never NaN.

FP8 KV (e4m3)
    K and V pages may be ``float8_e4m3fn`` with a per-tensor or per-head float32 scale.
    A program handles one KV head, so the K scale is one number folded into the score
    scale and the V scale one number applied to the output: the tile itself is only
    converted (exactly) to the 16-bit dot type. With an FP8 cache the dots run in fp16:
    e4m3 converts to fp16 in one instruction per pair, and fp16 keeps 3 more mantissa
    bits than bf16 for Q and P (a bf16 query beyond fp16's range, |q| > 65504, would
    overflow; real queries are far inside it). Left to itself the compiler moves V's
    FP8 tile into the dot's layout first, a byte-by-byte gather from shared memory, and
    converts afterwards; ``DecodeConfig.convert_v`` converts it by hand first, at the
    cost of a shared-memory round trip in fp16. That wins where the kernel waits on
    memory (H100) and loses where it waits on its instructions (H200): ``default_config``.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kvpilot.worker.kernels.cache import FP8_DTYPE, MAX_PAGE_SIZE

MAX_SPLITS = 256
# The head dimensions the kernel takes (kvpilot.api.support.WORKER_HEAD_DIMS says the
# same): powers of two, and 80 and 96 (Phi-2, Phi-3) in a tile padded to 128 columns
# whose padding is masked, so they cost 128's loads of rows that are shorter.
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, toks, pages, lo, end, k_head, v_head, qk_scale, softcap,
    stride_kp, stride_kt, stride_vp, stride_vt,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, CVT_ASM: tl.constexpr, MASKED: tl.constexpr, SWAP: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Fold one tile of tokens ``toks`` (held in ``pages``, read off the block table by
    the caller) into the running softmax. Only a MASKED tile (the last of a range, or
    the one a sliding window starts in) may hold tokens outside ``lo .. end``. A head_dim
    that is not a power of two is padded to ``BLOCK_D`` columns read as 0. With SOFTCAP
    ``qk_scale`` is the plain score scale and each score becomes
    ``softcap * tanh(score / softcap)``, then goes to base 2."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    # ---- addresses: (page, slot in the page) -> rows of head_dim elements ------------
    slots = toks % PAGE_SIZE
    k_rows = pages * stride_kp + slots * stride_kt
    v_rows = pages * stride_vp + slots * stride_vt
    k_ptrs = k_head + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_head + v_rows[:, None] + offs_d[None, :]
    # ---- loads: masked tokens read as 0, so stale slots never reach the products -----
    # Padded columns read as 0 too: they add 0 to Q K^T, and P V's are dropped at the store.
    if MASKED:
        valid = (toks < end) & (toks >= lo)
        kv_ok = valid[:, None]
        if PAD_D:
            kv_ok = kv_ok & d_ok
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        v = tl.load(v_ptrs, mask=d_ok, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if SWAP:
        # S^T = K Q^T and O^T = V^T P^T: tokens and head_dim fill the 64-row side of the
        # tensor-core product, the few query heads of the group its narrow side. Whole
        # tiles only (the caller sends the masked one unswapped).
        tl.static_assert(not MASKED)
        s = tl.dot(k.to(DOT_DTYPE), tl.trans(q)) * qk_scale
        if SOFTCAP:
            s = _soft_cap(s, softcap)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v.to(DOT_DTYPE)), p.to(DOT_DTYPE))
    else:
        # ---- S = Q K^T, online softmax (base 2), O += P V ------------------------------
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * qk_scale
        if SOFTCAP:
            s = _soft_cap(s, softcap)
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        # Every tile holds at least one valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if CVT_ASM:
            # e4m3 -> fp16 four at a time in an opaque (non-pure) step. Left to itself the
            # compiler converts after moving the FP8 tile into the dot's layout, which for V
            # (tokens must be consecutive per thread, pages hold head_dim contiguous) is a
            # gather of single bytes from shared memory; opaque, the conversion stays where
            # the tile is read in 16-byte pieces, and the fp16 tile moves by ldmatrix.trans.
            v = tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
                "cvt.rn.f16x2.e4m3x2 $1, hi; }",
                "=r,=r,r", [v.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False,
                pack=4)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
    return m_new, l_i, acc


@triton.jit
def _soft_cap(s, softcap):
    """``softcap * tanh(s / softcap)`` in base 2 (``tanh(x) = 2 sigmoid(2x) - 1``)."""
    return softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0) * 1.4426950408889634


@triton.jit
def _tile_pages(bt_row, toks, end, PAGE_SIZE: tl.constexpr):
    """The block-table entries of a tile's tokens ``toks`` (0 from ``end`` on), as int64."""
    return tl.load(bt_row + toks // PAGE_SIZE, mask=toks < end, other=0).to(tl.int64)


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "len_hint", "max_pages", "window"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    sm_scale, num_splits, len_hint, max_pages, window, softcap,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    scale_stride,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr,
    CVT_ASM: tl.constexpr, PDL: tl.constexpr, SWAP: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        # Programmatic dependent launch: the merge may be scheduled now; it waits for
        # this whole grid to finish (and its writes to land) before it reads a partial.
        tl.extra.cuda.gdc_launch_dependents()

    # ---- this program's token range: whole tiles, `tiles_per_split` of them ----------
    # EARLY_TABLE: the first tile's block-table entries are read without waiting for the
    # length, at the range a sequence of `len_hint` tokens (the host's upper bound of the
    # lengths) would get, and kept where the actual range starts there too (with one
    # split always, else for the longest sequences). That saves a dependent load before
    # the first K/V tile; entries past the sequence are only used for masked tokens.
    # Measured faster for FP8 and split launches, slower for unsplit bf16 ones (which
    # read the entries after the length): docs/worker.md, "Decode kernel".
    # A sliding window (WINDOW) reads only tokens lo .. seq_len-1, lo = seq_len - window:
    # the ranges cover the tiles from the one holding lo, and that tile is masked below
    # lo (its earlier slots may belong to tokens a ring of pages has overwritten).
    EARLY_TABLE: tl.constexpr = (SPLIT or KV_FP8) and not WINDOW
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    seq_len = tl.load(seq_lens_ptr + b)
    if EARLY_TABLE:
        guess = split * tl.cdiv(tl.cdiv(len_hint, BLOCK_N), num_splits) * BLOCK_N
        guess_idx = (guess + offs_n) // PAGE_SIZE
        pages = tl.load(bt_row + guess_idx, mask=guess_idx < max_pages, other=0).to(tl.int64)
    if WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    else:
        lo = 0
    first = lo - lo % BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, BLOCK_N), num_splits)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    full_end = tl.maximum(start, end - end % BLOCK_N)  # tiles before it need no mask

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    # Rows of real query heads, columns of the real head_dim (BLOCK_D pads it).
    gd_mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]

    # ---- the query heads of this KV group, one tile --------------------------------
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gd_mask, other=0.0).to(DOT_DTYPE)
    if SOFTCAP:
        qk_scale = sm_scale  # capped first, then to base 2 (_soft_cap)
    else:
        qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh * scale_stride)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    if SWAP:
        acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh

    # ---- main loop over whole tiles, then the partial last tile ----------------------
    # The block-table entries of the next tile are read one iteration ahead: K/V
    # addresses then depend on no load of their own iteration, which lets the compiler
    # keep several tiles of K/V in flight (num_stages) instead of one.
    if EARLY_TABLE:
        if start != guess:
            pages = _tile_pages(bt_row, start + offs_n, end, PAGE_SIZE)
    else:
        pages = _tile_pages(bt_row, start + offs_n, end, PAGE_SIZE)
    if WINDOW:
        if start < lo:  # the tile the window starts in (never swapped: WINDOW turns SWAP off)
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start + offs_n, pages, lo, end, k_head, v_head, qk_scale,
                softcap, stride_kp, stride_kt, stride_vp, stride_vt,
                PAGE_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_DTYPE, CVT_ASM, True, False, SOFTCAP)
            start += BLOCK_N
            full_end = tl.maximum(start, full_end)
            pages = _tile_pages(bt_row, start + offs_n, end, PAGE_SIZE)
    for tok0 in range(start, full_end, BLOCK_N):
        toks = tok0 + offs_n
        next_pages = _tile_pages(bt_row, toks + BLOCK_N, end, PAGE_SIZE)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, toks, pages, lo, end, k_head, v_head, qk_scale, softcap,
            stride_kp, stride_kt, stride_vp, stride_vt,
            PAGE_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_DTYPE, CVT_ASM, False, SWAP, SOFTCAP)
        pages = next_pages
    if SWAP:
        # The partial last tile goes through the unswapped products: compiled swapped,
        # that (unpipelined) masked tile gave wrong partials on Hopper (triton 3.6),
        # while the pipelined loop above is exact.
        acc = tl.trans(acc)
    if full_end < end:
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, full_end + offs_n, pages, lo, end, k_head, v_head, qk_scale,
            softcap, stride_kp, stride_kt, stride_vp, stride_vt,
            PAGE_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_DTYPE, CVT_ASM, True, False, SOFTCAP)

    # ---- epilogue -------------------------------------------------------------------
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr + kvh * scale_stride)
    has_tokens = l_i > 0.0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if SPLIT:
        # Partials: [batch, q_heads, num_splits, HEAD_DIM] and [batch, q_heads, num_splits].
        row = (b * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=gd_mask)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (sequence, query head, ``BLOCK_D`` slice of head_dim; the last
    slice masked where it runs past HEAD_DIM)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    row0 = (b * tl.num_programs(1) + h) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if PDL:
        tl.extra.cuda.gdc_wait()  # the decode grid has finished and its partials landed

    # ---- one pass, BLOCK_S splits at a time, rescaled to the running max of lse ------
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    den = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        mask = s0 + offs_s < num_splits
        lse = tl.load(part_lse_ptr + row0 + s0 + offs_s, mask=mask, other=float("-inf"))
        part = tl.load(part_out_ptr + (row0 + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=mask[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        # Empty splits have lse = -inf: weight exp2(-inf) = 0. While every split so far
        # is empty the max is -inf too; subtract 0 then, not -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        den = den * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)


def merge_shape(num_splits: int, head_dim: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_D)`` of the merge: up to 16 splits, whole heads 16 splits at a
    time; more, every split (up to MAX_SPLITS) in one load of a 16-wide slice of the head,
    so no program waits on a chain of loads. Two compiled variants in all."""
    if num_splits <= 16:
        return 16, triton.next_power_of_2(head_dim)
    return MAX_SPLITS, 16


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel. ``min_tiles``: the shortest split, in tiles of
    ``block_n`` tokens; ``maxnreg``: a register cap per thread (None: the compiler's);
    ``convert_v``: an FP8 cache's V tile is converted to fp16 by hand before it moves
    into the dot's layout; ``swap``: the products are computed transposed, ``S^T = K
    Q^T`` and ``O^T = V^T P^T`` (see ``_attend_tile``)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    min_tiles: int = 2
    maxnreg: int | None = None
    convert_v: bool = False
    swap: bool = False


# Peak DRAM bytes/s per SM below which the FP8 kernel waits on memory rather than on its
# own instructions (H100 SXM: 25 GB/s per SM; H200: 36).
FP8_MEMORY_BOUND_PER_SM = 30e9


def default_config(kv_dtype: torch.dtype, head_dim: int, units: int, num_sms: int,
                   memory_per_sm: float | None = None,
                   capability: tuple[int, int] = (0, 0)) -> DecodeConfig:
    """The launch shape measured best (benchmarks/decode_kernel.py), by cache dtype, by how
    many (sequence, KV head) units there are against the SMs, for FP8 by the GPU's peak
    DRAM bytes/s per SM (``memory_per_sm``, None where unknown), and for swapping the
    products by the compute capability (measured on Hopper, where they become warpgroup
    MMAs; other GPUs keep the unswapped shape).

    FP8: one warp per program, three tiles in flight. An FP8 tile is converted to fp16
    in registers, so the kernel is bound by latency more than by bytes; small one-warp
    programs fit 8 to an SM and need no warp to wait on another for a tile's softmax.
    Where memory is slow for the SMs (under ``FP8_MEMORY_BOUND_PER_SM``: H100) the
    kernel waits on memory, and V converted by hand with 16-token tiles was faster.
    Where it is fast (H200) the kernel waits on its own instructions, and the extra
    shared-memory round trip made it slower than the compiler's conversion with 32-token
    tiles, which it keeps (figures: docs/worker.md, "Decode kernel").
    16-bit, by (sequence, KV head) units per SM: under a quarter (long sequences,
    batches of 1-4): 64-token tiles, four warps, the sequences split to fill the GPU, on
    Hopper and later three tiles in flight with the products swapped (``swap``), else
    four unswapped; a quarter to a half, or at least two: 32-token tiles and one warp,
    so more, smaller programs share an SM; a half to one: 64-token tiles, four warps,
    four tiles in flight; one to two: the same with three. Head dims above 128 take
    smaller tiles (registers).
    """
    wide = head_dim > 128
    if kv_dtype == FP8_DTYPE:
        if wide:
            return DecodeConfig(block_n=32, num_warps=2, num_stages=3)
        if memory_per_sm is not None and memory_per_sm < FP8_MEMORY_BOUND_PER_SM:
            return DecodeConfig(block_n=16, num_warps=1, num_stages=3, convert_v=True)
        return DecodeConfig(block_n=32, num_warps=1, num_stages=3)
    if wide:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=4)
    if units >= 2 * num_sms or num_sms // 4 <= units < num_sms // 2:
        return DecodeConfig(block_n=32, num_warps=1, num_stages=4)
    if units >= num_sms:
        return DecodeConfig(block_n=64, num_warps=4, num_stages=3)
    if units < num_sms // 4 and capability >= (9, 0):
        return DecodeConfig(block_n=64, num_warps=4, num_stages=3, swap=True)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=4)


def choose_num_splits(units: int, max_seq_len: int, block_n: int, slots: int,
                      min_tiles: int = 2) -> int:
    """How many ranges to cut each sequence into: a pure function of the launch shape.

    ``units`` = batch x kv_heads programs without splitting; ``slots`` = programs the GPU
    runs at once (SMs x programs per SM). Programs of equal length run in waves of
    ``slots`` and a wave lasts as long as its programs, so a second, partly filled wave
    costs nearly as much as a full one. The count is the largest that still fits one
    wave (``units x s <= slots``); 1 when the batch alone fills the GPU. No split is
    shorter than ``min_tiles`` tiles, and there are at most ``MAX_SPLITS``. Each range is
    ``ceil(tiles / s)`` whole tiles, so where fewer splits give ranges of the same length
    the rest would be empty for the longest sequence: they are not launched.
    """
    if units >= slots:
        return 1
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    splits = max(1, min(slots // units, tiles // min_tiles, MAX_SPLITS))
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, *, regs_per_sm: int = 65536,
                    shared_per_sm: int = 233472, max_warps: int = 64, max_ctas: int = 32) -> int:
    """Programs of a compiled kernel that fit on one SM at once (registers are given out
    per warp in units of 256, each program's shared memory carries 1 KiB reserved)."""
    regs_per_warp = max(256, triton.cdiv(n_regs * 32, 256) * 256)
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_warps = max_warps // num_warps
    by_shared = shared_per_sm // (shared_bytes + 1024)
    return max(1, min(by_regs, by_warps, by_shared, max_ctas))


# Programs per SM of each compiled variant, read off the kernel after its first launch;
# until then a guess of 2 steers the split count (only speed depends on it).
_OCCUPANCY: dict[tuple, int] = {}
_LIBCUDA: list = []


def _libcuda():
    if not _LIBCUDA:
        _LIBCUDA.append(ctypes.CDLL("libcuda.so.1"))
    return _LIBCUDA[0]


def _driver_occupancy(kernel, num_warps: int) -> int | None:
    """Programs per SM as the CUDA driver computes it for this compiled kernel (registers,
    shared memory, carve-out), or None where that cannot be asked."""
    function = getattr(kernel, "function", None)
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if not isinstance(function, int) or not isinstance(shared, int):
        return None
    try:
        blocks = ctypes.c_int(0)
        err = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(blocks), ctypes.c_void_p(function), ctypes.c_int(32 * num_warps),
            ctypes.c_size_t(shared))
    except (OSError, AttributeError):
        return None
    return blocks.value if err == 0 and blocks.value > 0 else None


@dataclass(frozen=True)
class _DeviceFacts:
    """What the launcher asks of a device, once per device. ``memory_rate``: peak DRAM
    bytes/s (None where unknown); ``capability``: (0, 0) where nothing is compiled."""

    sms: int
    regs_per_sm: int
    shared_per_sm: int
    memory_rate: float | None
    capability: tuple[int, int]


# The interpreter (CPU tensors): any numbers exercise the same code.
_INTERPRETER_FACTS = _DeviceFacts(132, 65536, 233472, None, (0, 0))
_DEVICES: dict[int, _DeviceFacts] = {}


def _driver_memory_rate(index: int) -> float | None:
    """2 x memory clock x bus width, as the CUDA driver reports them, or None."""
    try:
        lib, dev = _libcuda(), ctypes.c_int(0)
        clock_khz, bus_bits = ctypes.c_int(0), ctypes.c_int(0)
        if (lib.cuDeviceGet(ctypes.byref(dev), index) == 0
                and lib.cuDeviceGetAttribute(ctypes.byref(clock_khz), 36, dev) == 0  # memory clock
                and lib.cuDeviceGetAttribute(ctypes.byref(bus_bits), 37, dev) == 0  # bus width
                and clock_khz.value > 0 and bus_bits.value > 0):
            return 2 * clock_khz.value * 1e3 * bus_bits.value / 8
    except (OSError, AttributeError):
        pass
    return None


def _device_facts(device: torch.device) -> _DeviceFacts:
    if device.type != "cuda" or _interpreting():
        return _INTERPRETER_FACTS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICES:
        p = torch.cuda.get_device_properties(index)
        _DEVICES[index] = _DeviceFacts(
            p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
            getattr(p, "shared_memory_per_multiprocessor", 233472),
            _driver_memory_rate(index), (p.major, p.minor))
    return _DEVICES[index]


def default_config_for(q: torch.Tensor, k_cache: torch.Tensor) -> DecodeConfig:
    """``default_config`` for these inputs on their device (its SMs, memory rate and
    compute capability)."""
    return _config_on(_device_facts(q.device), q, k_cache)


def _config_on(facts: _DeviceFacts, q: torch.Tensor, k_cache: torch.Tensor) -> DecodeConfig:
    """``default_config`` for these inputs on a device with these facts."""
    return default_config(k_cache.dtype, q.shape[2], q.shape[0] * k_cache.shape[2], facts.sms,
                          None if facts.memory_rate is None else facts.memory_rate / facts.sms,
                          facts.capability)


def _remember_occupancy(key: tuple, kernel, num_warps: int, device: torch.device) -> None:
    occupancy = _driver_occupancy(kernel, num_warps)
    if occupancy is None:  # estimate from the kernel's registers and shared memory
        n_regs = getattr(kernel, "n_regs", None)
        shared = getattr(getattr(kernel, "metadata", None), "shared", None)
        if not isinstance(n_regs, int) or not isinstance(shared, int) or n_regs <= 0:
            return
        facts = _device_facts(device)
        occupancy = programs_per_sm(n_regs, shared, num_warps, regs_per_sm=facts.regs_per_sm,
                                    shared_per_sm=facts.shared_per_sm)
    _OCCUPANCY[key] = occupancy


def _occupancy_key(q: torch.Tensor, k_cache: torch.Tensor, cfg: DecodeConfig) -> tuple:
    group = q.shape[1] // k_cache.shape[2]
    return (q.device.index, q.dtype, k_cache.dtype, q.shape[2], group, k_cache.shape[1], cfg)


def _length_bound(k_cache: torch.Tensor, block_table: torch.Tensor, max_seq_len: int | None) -> int:
    """``max_seq_len``, or what the block table can hold (``max_pages x page_size``): an
    upper bound of the lengths known without reading them off the device."""
    return block_table.shape[1] * k_cache.shape[1] if max_seq_len is None else max_seq_len


def plan_num_splits(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, *,
                    config: DecodeConfig | None = None, max_seq_len: int | None = None,
                    window: int | None = None) -> int:
    """The split count ``paged_attention_decode`` uses when none is given.

    ``max_seq_len`` defaults to what the block table can hold (``max_pages x
    page_size``), an upper bound known without reading the lengths off the device.
    """
    facts = _device_facts(q.device)
    cfg = config or _config_on(facts, q, k_cache)
    if window is not None and cfg.swap:
        cfg = replace(cfg, swap=False)
    bound = _read_bound(_length_bound(k_cache, block_table, max_seq_len), window, cfg)
    return _planned_splits(q.shape[0] * k_cache.shape[2], bound, cfg, facts.sms,
                           _occupancy_key(q, k_cache, cfg))


def _read_bound(length_bound: int, window: int | None, cfg: DecodeConfig) -> int:
    """Tokens a program range may cover: the length bound, or within a window the window
    and the tile it starts in."""
    return length_bound if window is None else min(length_bound, window + cfg.block_n)


def _planned_splits(units: int, max_seq_len: int, cfg: DecodeConfig, sms: int, key: tuple) -> int:
    """``choose_num_splits`` with this variant's programs per SM (2 until it is known)."""
    return choose_num_splits(units, max_seq_len, cfg.block_n, sms * _OCCUPANCY.get(key, 2),
                             cfg.min_tiles)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` (``[batch, q_heads, head_dim]``, bf16/fp16) over paged K/V.

    ``k_cache``/``v_cache``: logical ``[num_pages, page_size, kv_heads, head_dim]``, the
    dtype of ``q`` or ``float8_e4m3fn`` with ``k_scale``/``v_scale`` (float32, ``[1]``
    or ``[kv_heads]``). ``block_table``: int32 ``[batch, max_pages]``; ``seq_lens``:
    int32 ``[batch]``. ``max_seq_len`` (an upper bound of the lengths, default
    ``max_pages * page_size``) steers the split count and where each program reads its
    first block-table entries before the lengths arrive: the tightest bound is fastest,
    and any value gives the same result. ``num_splits`` overrides the split count (fix
    it when capturing a CUDA graph). ``window``: a sliding-window layer's window, the
    query (the last token) attends only to the last ``window`` tokens (a page table that
    is a ring of pages, repeated, works: the slots of earlier tokens are never read).
    ``softcap``: scores become ``softcap * tanh(score / softcap)`` (Gemma 2). Returns
    ``[batch, q_heads, head_dim]`` in the dtype of ``q``.
    """
    # ---- shapes, dtypes, strides ----------------------------------------------------
    _check(q.dim() == 3, f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    batch, q_heads, head_dim = q.shape
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           "k_cache and v_cache must both be [num_pages, page_size, kv_heads, head_dim]")
    num_pages, page_size, kv_heads, kv_dim = k_cache.shape
    _check(kv_dim == head_dim, f"head_dim of q ({head_dim}) and cache ({kv_dim}) differ")
    _check(head_dim in HEAD_DIMS,
           f"head_dim must be one of {', '.join(map(str, HEAD_DIMS))}, got {head_dim}")
    _check(1 <= page_size <= MAX_PAGE_SIZE, f"page_size must be 1..{MAX_PAGE_SIZE}")
    _check(q_heads % kv_heads == 0, f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    _check(q.dtype in (torch.bfloat16, torch.float16), f"q must be bf16 or fp16, got {q.dtype}")
    _check(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    kv_fp8 = k_cache.dtype == FP8_DTYPE
    _check(kv_fp8 or k_cache.dtype == q.dtype,
           f"cache dtype {k_cache.dtype} must be q's ({q.dtype}) or float8_e4m3fn")
    _check(q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1,
           "head_dim must be contiguous in q and the caches")
    _check(block_table.dim() == 2 and block_table.shape[0] == batch
           and block_table.dtype == torch.int32 and block_table.stride(1) == 1,
           "block_table must be int32 [batch, max_pages] with contiguous rows")
    _check(seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32 and seq_lens.is_contiguous(),
           "seq_lens must be contiguous int32 [batch]")
    if kv_fp8:
        _check(k_scale is not None and v_scale is not None, "an FP8 cache needs k_scale and v_scale")
        _check(k_scale.numel() in (1, kv_heads) and v_scale.numel() == k_scale.numel()
               and k_scale.dtype == torch.float32 and v_scale.dtype == torch.float32,
               f"k_scale/v_scale must be float32 with 1 or {kv_heads} elements")
        scale_stride = 0 if k_scale.numel() == 1 else 1
    else:
        k_scale = v_scale = seq_lens  # never read
        scale_stride = 0
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _check(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1,
           "out must be shaped and typed like q, head_dim contiguous")

    # ---- launch shape ----------------------------------------------------------------
    _check(window is None or window >= 1, "window must be >= 1")
    _check(softcap is None or softcap > 0, "softcap must be > 0")
    facts = _device_facts(q.device)
    cfg = config or _config_on(facts, q, k_cache)
    if window is not None and cfg.swap:
        cfg = replace(cfg, swap=False)  # the window's first tile is masked
    key = _occupancy_key(q, k_cache, cfg)
    # Unpipelined, the swapped products compile wrong on Hopper (triton 3.6: wrong values
    # for masked tiles, illegal addresses with num_stages=1), so they need a pipeline.
    _check(not cfg.swap or cfg.num_stages >= 2, "a swapped config needs num_stages >= 2")
    group = q_heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group))
    _check(max_seq_len is None or 0 <= max_seq_len < 2**31, "max_seq_len must be 0..2**31-1")
    len_hint = _length_bound(k_cache, block_table, max_seq_len)
    if num_splits is None:
        num_splits = _planned_splits(batch * kv_heads, _read_bound(len_hint, window, cfg),
                                     cfg, facts.sms, key)
    _check(1 <= num_splits <= MAX_SPLITS, f"num_splits must be 1..{MAX_SPLITS}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    dot_dtype = tl.float16 if kv_fp8 or q.dtype == torch.float16 else tl.bfloat16
    if _interpreting() and dot_dtype == tl.bfloat16:
        # The interpreter multiplies bf16 dot operands as raw bits (triton issue #11584,
        # "not supported yet"); fp32 operands give the same products exactly.
        dot_dtype = tl.float32

    split = num_splits > 1
    if split:
        part_out = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # never read

    extra = {} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}
    capability = facts.capability
    pdl = split and capability >= (9, 0)  # programmatic dependent launch: Hopper on
    kernel = _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale,
        out, part_out, part_lse,
        sm_scale, num_splits, len_hint, block_table.shape[1], window or 0, softcap or 1.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        scale_stride,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_SIZE=page_size, BLOCK_N=cfg.block_n,
        SPLIT=split, KV_FP8=kv_fp8, DOT_DTYPE=dot_dtype,
        CVT_ASM=kv_fp8 and cfg.convert_v and capability >= (8, 9),  # cvt from e4m3: sm_89 on
        PDL=pdl, SWAP=cfg.swap, WINDOW=window is not None, SOFTCAP=softcap is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )
    if key not in _OCCUPANCY:
        _remember_occupancy(key, kernel, cfg.num_warps, q.device)
    if split:
        block_s, block_d = merge_shape(num_splits, head_dim)
        _merge_splits_kernel[(batch, q_heads, triton.cdiv(head_dim, block_d))](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl, num_warps=4,
            launch_pdl=pdl,
        )
    return out
