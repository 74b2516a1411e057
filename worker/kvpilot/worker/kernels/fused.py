"""Small fused kernels of a Llama layer, each with its plain PyTorch reference beside it.

At decode batch sizes a layer's elementwise work (RMSNorm, the residual add, SwiGLU's
``silu(gate) * up``, RoPE) is a few kilobytes per token, but in eager PyTorch it is a
dozen kernels per layer, each costing a launch and a round trip through memory. Here each
is one kernel: one program per token row, computed in float32, stored in the input dtype.

* ``add_rms_norm(x, residual, weight, eps)``: ``residual += x`` (when given), then
  ``rms_norm(residual) * weight``; returns ``(normed, residual)``. Rounding follows
  Hugging Face's ``LlamaRMSNorm``: the sum is rounded to the dtype, normalized in float32,
  rounded to the dtype, then multiplied by the weight.
* ``silu_mul(gate_up)``: ``silu(gate) * up`` of the fused ``[tokens, 2 * inter]`` tensor.
* ``rope_(q, k, positions, cos, sin)``: rotate ``q`` and ``k`` in place by the
  non-interleaved ("rotate half") convention of Llama checkpoints.

The model calls the reference on CPU and the kernel on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------
# RMSNorm with the residual add
# --------------------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         stride_x, stride_res, stride_out, stride_res_out,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, normed * w, mask=mask)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight, x


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``, ``residual``: ``[tokens, hidden]`` with contiguous rows."""
    tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1
    if tokens:
        block = triton.next_power_of_2(hidden)
        _add_rms_norm_kernel[(tokens,)](
            x, residual if residual is not None else x, weight, out, res_out, hidden, eps,
            x.stride(0), (residual if residual is not None else x).stride(0),
            out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out, res_out


# --------------------------------------------------------------------------------------
# SwiGLU activation
# --------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, double = gate_up.shape
    inter = double // 2
    assert gate_up.stride(1) == 1 and double == 2 * inter
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = 1024
        _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------------------
# Rotary position embedding, in place
# --------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(ptr, stride_h, heads, cos, sin, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rotate the first ``heads`` rows of ``head_dim = 2 * HALF`` elements at ``ptr``, in
    place (``BLOCK_HALF``: HALF padded to a power of two, masked)."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h < heads)[:, None] & (d < HALF)[None, :]
    p1 = ptr + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                 Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, Q_HEADS, cos, sin, BLOCK_H, HALF, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, K_HEADS, cos, sin, BLOCK_H, HALF, BLOCK_HALF)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_ref_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    q.copy_(_rotate(q, c, s))
    k.copy_(_rotate(k, c, s))


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> None:
    """``q``: ``[tokens, q_heads, head_dim]``, ``k``: ``[tokens, kv_heads, head_dim]``
    (head_dim contiguous; views into the fused QKV output are fine); ``cos``/``sin``:
    float32 ``[max_positions, head_dim / 2]``."""
    tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    assert cos.shape[1] * 2 == head_dim
    if tokens:
        _rope_kernel[(tokens,)](
            q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), Q_HEADS=q_heads, K_HEADS=k_heads,
            BLOCK_H=triton.next_power_of_2(max(q_heads, k_heads)), HALF=head_dim // 2,
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            num_warps=4)
