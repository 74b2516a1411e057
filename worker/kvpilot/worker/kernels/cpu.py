"""The CPU backend of the paged-KV kernels, in plain PyTorch: what the worker runs without
a GPU, and, being slow and obvious, what the Triton kernels are tested against.

Nothing here imports Triton. The decode reference gathers each sequence's pages into a
contiguous ``[seq_len, kv_heads, head_dim]`` tensor (dequantizing an FP8 cache with its
scales) and computes softmax attention in float32 with the query heads grouped onto
their KV head, one sequence at a time.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def _per_head(scale: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return scale.float().reshape(-1).expand(kv_heads) if scale.numel() == 1 else scale.float()


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (``[..., kv_heads, head_dim]``) to e4m3 as ``x / scale``, saturated to +-448."""
    s = _per_head(scale, x.shape[-2])[:, None]
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(pages: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of a cache tensor (``[..., kv_heads, head_dim]``)."""
    if pages.dtype != FP8_DTYPE:
        return pages.float()
    if scale is None:
        raise ValueError("an FP8 cache needs its scale to be read")
    return pages.float() * _per_head(scale, pages.shape[-2])[:, None]


def gather_sequence(pages: torch.Tensor, block_table_row: torch.Tensor, seq_len: int,
                    first: int = 0) -> torch.Tensor:
    """Tokens ``first..seq_len-1`` of one sequence: ``[seq_len - first, kv_heads, head_dim]``."""
    page_size = pages.shape[1]
    positions = torch.arange(first, seq_len, device=pages.device)
    page_ids = block_table_row.long()[positions // page_size]
    return pages[page_ids, positions % page_size]


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor,
                          v_pages: torch.Tensor, slots: torch.Tensor,
                          k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> None:
    """What ``cache.reshape_and_cache`` does, in place: slot -1 is skipped."""
    page_size = k_pages.shape[1]
    keep = slots >= 0
    slots = slots[keep].long()
    key, value = key[keep], value[keep]
    if k_pages.dtype == FP8_DTYPE:
        key, value = quantize_fp8(key, k_scale), quantize_fp8(value, v_scale)
    k_pages[slots // page_size, slots % page_size] = key.to(k_pages.dtype)
    v_pages[slots // page_size, slots % page_size] = value.to(v_pages.dtype)


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                        sm_scale: float | None = None,
                        k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None,
                        window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Decode attention of one query token per sequence, in float32.

    ``q``: ``[batch, q_heads, head_dim]``; pages, block table and lengths as in
    ``kvpilot.worker.kernels.cache``. ``window``: only the last ``window`` tokens are
    attended to; ``softcap``: scores become ``softcap * tanh(score / softcap)``. Returns
    float32 ``[batch, q_heads, head_dim]``; a sequence of length 0 gives zeros.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.zeros(batch, q_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        lo = 0 if window is None else max(0, n - window)
        k = dequantize(gather_sequence(k_pages, block_table[b], n, lo), k_scale)
        v = dequantize(gather_sequence(v_pages, block_table[b], n, lo), v_scale)
        group = q_heads // kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [q_heads, n, head_dim]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hnd->hn", q[b].float(), k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v)
    return out
