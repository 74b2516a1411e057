"""The paged KV cache: page layout, block table, slot mapping, and ``reshape_and_cache``.

Pages
    Each layer keeps K and V in two tensors of fixed-size pages. Their logical shape is
    always ``[num_pages, page_size, kv_heads, head_dim]``; ``head_dim`` is contiguous. The
    physical order of the other three axes is a choice made at allocation, carried by the
    strides, and every kernel reads the strides rather than assuming one order:

    * token-major (``order="token"``): ``[num_pages, page_size, kv_heads, head_dim]``
      in memory. One token's K for all heads is one contiguous row, so writing a new
      token is one contiguous store per tensor.
    * head-major (``order="head"``, the default): ``[num_pages, kv_heads, page_size,
      head_dim]`` in memory, viewed back to the logical shape. One page of one head is one
      contiguous run (``page_size x head_dim`` elements, 4 KiB for 16 bf16 tokens of 128),
      which is what the decode kernel reads: one program handles one KV head, so every
      page it touches is one unbroken stretch of memory instead of ``page_size`` rows
      spread ``kv_heads x head_dim`` elements apart. Measured on an H200 the two orders
      decode within 2% of each other (benchmarks/decode_kernel.py); head-major stays the
      default because what one program reads of a page is then one contiguous run.

    ``page_size`` is 1..128 tokens (16 by default); any value works, powers of two are
    the cheapest to index.

Block table
    ``block_table[b, i]`` (int32, ``[batch, max_pages]``) is the physical page holding
    tokens ``i * page_size .. (i + 1) * page_size - 1`` of sequence ``b``; pages need not
    be contiguous or ordered. ``seq_lens[b]`` (int32) says how many tokens are valid, so
    entries at and past ``cdiv(seq_lens[b], page_size)`` are never read and may hold
    anything (the block manager leaves them stale). The table is row-padded to the
    longest sequence of the batch.

Slot mapping
    A new token's place is one integer, ``slot = page * page_size + offset``; slot -1 marks
    a padding token that must not be written (the batch was padded to a captured size).

FP8 (e4m3)
    An FP8 cache stores ``x / scale`` rounded to ``float8_e4m3fn`` (saturated to +-448)
    and reads back ``stored * scale``. ``k_scale`` and ``v_scale`` are float32 tensors of
    one element (per tensor) or ``kv_heads`` elements (per head); they stay on the device
    so no kernel launch needs a host sync. Bytes per token are those of
    ``kvpilot.api.memory.kv_bytes_per_token`` with ``kv_dtype="fp8"``: scales are
    per tensor or per head, never per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
CACHE_DTYPES = (torch.bfloat16, torch.float16, FP8_DTYPE)
MAX_PAGE_SIZE = 128


@dataclass
class LayerKV:
    """One layer's pages. ``key``/``value``: logical ``[num_pages, page_size, kv_heads,
    head_dim]``; ``k_scale``/``v_scale``: float32 ``[1]`` or ``[kv_heads]``, set only for
    an FP8 cache."""

    key: torch.Tensor
    value: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def page_size(self) -> int:
        return self.key.shape[1]

    @property
    def is_fp8(self) -> bool:
        return self.key.dtype == FP8_DTYPE


# Physical orders of a page tensor, each viewed as [num_pages, page_size, kv_heads, head_dim].
ORDERS = {
    "token": (0, 1, 2, 3),  # [num_pages, page_size, kv_heads, head_dim]
    "head": (0, 2, 1, 3),   # [num_pages, kv_heads, page_size, head_dim]
}


def allocate_pages(
    num_pages: int,
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    order: str = "head",
) -> torch.Tensor:
    """One uninitialised page tensor in the logical shape, physically ordered as asked."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {CACHE_DTYPES}, got {dtype}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    perm = ORDERS[order]
    logical = (num_pages, page_size, kv_heads, head_dim)
    pages = torch.empty([logical[i] for i in perm], dtype=dtype, device=device)
    return pages.permute([perm.index(i) for i in range(4)])


def allocate_layer(
    num_pages: int,
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    k_order: str = "head",
    v_order: str = "head",
    per_head_scales: bool = False,
) -> LayerKV:
    """K and V pages of one layer; an FP8 layer starts with unit scales."""
    key = allocate_pages(num_pages, page_size, kv_heads, head_dim, dtype, device, order=k_order)
    value = allocate_pages(num_pages, page_size, kv_heads, head_dim, dtype, device, order=v_order)
    if dtype != FP8_DTYPE:
        return LayerKV(key, value)
    n = kv_heads if per_head_scales else 1
    ones = torch.ones(n, dtype=torch.float32, device=device)
    return LayerKV(key, value, ones, ones.clone())


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slots of token ``positions[b]`` of each sequence ``b`` (one new token per sequence)."""
    rows = torch.arange(block_table.shape[0], device=block_table.device)
    pages = block_table[rows, positions // page_size].long()
    return pages * page_size + positions % page_size


# --------------------------------------------------------------------------------------
# Kernel: one program per new token, all its heads at once (one [heads, head_dim] tile).
# --------------------------------------------------------------------------------------
@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_scale_ptr, v_scale_ptr,
    stride_key_t, stride_key_h, stride_val_t, stride_val_h,
    stride_kc_p, stride_kc_t, stride_kc_h,
    stride_vc_p, stride_vc_t, stride_vc_h,
    scale_stride,
    KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX_VAL: tl.constexpr,
):
    t = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two, masked
    # The slot, once per head row (one cached address): a per-row value keeps the mask a
    # plain tensor, which the interpreter requires.
    slot = tl.load(slots_ptr + t + offs_h * 0).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    # Padding tokens (slot -1) write nothing.
    mask = ((offs_h < KV_HEADS) & (slot >= 0))[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(key_ptr + t * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :],
                mask=mask, other=0.0)
    v = tl.load(value_ptr + t * stride_val_t + offs_h[:, None] * stride_val_h + offs_d[None, :],
                mask=mask, other=0.0)
    if QUANTIZE:
        hmask = offs_h < KV_HEADS
        k_scale = tl.load(k_scale_ptr + offs_h * scale_stride, mask=hmask, other=1.0)
        v_scale = tl.load(v_scale_ptr + offs_h * scale_stride, mask=hmask, other=1.0)
        k = k.to(tl.float32) / k_scale[:, None]
        v = v.to(tl.float32) / v_scale[:, None]
        # Saturate: e4m3fn has no infinity, an out-of-range value would become NaN.
        k = tl.minimum(tl.maximum(k, -FP8_MAX_VAL), FP8_MAX_VAL)
        v = tl.minimum(tl.maximum(v, -FP8_MAX_VAL), FP8_MAX_VAL)

    kc = page * stride_kc_p + offset * stride_kc_t + offs_h * stride_kc_h
    vc = page * stride_vc_p + offset * stride_vc_t + offs_h * stride_vc_h
    tl.store(k_cache_ptr + kc[:, None] + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty),
             mask=mask)
    tl.store(v_cache_ptr + vc[:, None] + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, layer: LayerKV,
                      slots: torch.Tensor) -> None:
    """Write ``key``/``value`` (``[tokens, kv_heads, head_dim]``) into ``layer`` at ``slots``
    (``[tokens]``, int32/int64, -1 = skip), quantizing to FP8 when the cache is FP8."""
    num_pages, page_size, kv_heads, head_dim = layer.key.shape
    tokens = key.shape[0]
    if key.shape != (tokens, kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value must be [tokens, {kv_heads}, {head_dim}], got "
                         f"{tuple(key.shape)} / {tuple(value.shape)}")
    if slots.shape != (tokens,):
        raise ValueError(f"slots must be [{tokens}], got {tuple(slots.shape)}")
    if layer.value.shape != layer.key.shape or layer.value.dtype != layer.key.dtype:
        raise ValueError("key and value caches must have the same shape and dtype")
    for name, t in (("key", key), ("value", value), ("key cache", layer.key),
                    ("value cache", layer.value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim")
    quantize = layer.is_fp8
    if quantize:
        if layer.k_scale is None or layer.v_scale is None:
            raise ValueError("an FP8 cache needs k_scale and v_scale")
        if layer.k_scale.numel() not in (1, kv_heads) or layer.v_scale.numel() != layer.k_scale.numel():
            raise ValueError(f"scales must have 1 or {kv_heads} elements")
        k_scale, v_scale = layer.k_scale, layer.v_scale
        scale_stride = 0 if k_scale.numel() == 1 else 1
    else:
        k_scale = v_scale = slots  # never read
        scale_stride = 0
    if tokens == 0:
        return
    _reshape_and_cache_kernel[(tokens,)](
        key, value, layer.key, layer.value, slots, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer.key.stride(0), layer.key.stride(1), layer.key.stride(2),
        layer.value.stride(0), layer.value.stride(1), layer.value.stride(2),
        scale_stride,
        KV_HEADS=kv_heads, BLOCK_H=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size, QUANTIZE=quantize, FP8_MAX_VAL=FP8_MAX,
        num_warps=4,
    )
