"""Shared by the kernel tests: random paged worlds, tolerances and the error measure.

Importing it selects where the kernels run: the GPU when there is one, else Triton's
interpreter on CPU (set before Triton is first imported).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvpilot.worker.kernels import cache as kv_cache  # noqa: E402
from kvpilot.worker.kernels.cpu import FP8_DTYPE, quantize_fp8  # noqa: E402
from kvpilot.worker.kernels.cpu import paged_attention as paged_attention_ref  # noqa: E402
from kvpilot.worker.kernels.paged_attention import paged_attention_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref||: bf16 keeps 8 mantissa bits (output and P rounded to it), fp16 11.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The kernel's FP8 path converts e4m3 exactly and runs the dots in fp16, so against the
# dequantized reference its error is that of its bf16 output; against the unquantized
# values e4m3's 3 mantissa bits dominate (about 2-3e-2 measured).
FP8_TOL = TOL[torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output (unwritten or bad masking)"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class World:
    """Random sequences in a paged cache with a shuffled, non-contiguous block table."""

    def __init__(self, seq_lens, kv_heads, group, head_dim, page_size, dtype, *,
                 k_order="head", v_order="head", seed=0, spare_pages=3, q_scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens_list = list(seq_lens)
        batch = len(seq_lens)
        pages_per_seq = [-(-n // page_size) for n in seq_lens]
        max_pages = max(max(pages_per_seq), 1) + 1  # a stale column past every sequence
        num_pages = sum(pages_per_seq) + spare_pages
        perm = torch.randperm(num_pages, generator=g)
        # Stale entries past a sequence's pages: arbitrary page ids the kernel must not read.
        table = torch.randint(0, num_pages, (batch, max_pages), generator=g, dtype=torch.int32)
        taken = 0
        for b, n in enumerate(pages_per_seq):
            table[b, :n] = perm[taken:taken + n].to(torch.int32)
            taken += n
        self.block_table = table.to(DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.layer = kv_cache.allocate_layer(num_pages, page_size, kv_heads, head_dim, dtype,
                                             DEVICE, k_order=k_order, v_order=v_order)
        # Fill every page (including unused ones) with random values: never test on zeros.
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k_full = torch.randn(shape, generator=g).to(DEVICE)
        self.v_full = torch.randn(shape, generator=g).to(DEVICE)
        q_dtype = torch.bfloat16 if dtype == FP8_DTYPE else dtype
        self.q = (q_scale * torch.randn(batch, kv_heads * group, head_dim, generator=g)).to(
            q_dtype).to(DEVICE)
        if dtype == FP8_DTYPE:
            self.layer.k_scale.copy_(self.k_full.abs().amax() / 448.0)
            self.layer.v_scale.copy_(self.v_full.abs().amax() / 448.0)
            self.layer.key.copy_(quantize_fp8(self.k_full, self.layer.k_scale))
            self.layer.value.copy_(quantize_fp8(self.v_full, self.layer.v_scale))
        else:
            self.layer.key.copy_(self.k_full)
            self.layer.value.copy_(self.v_full)

    def run(self, **kw):
        out = torch.full_like(self.q, float("nan"))
        return paged_attention_decode(self.q, self.layer.key, self.layer.value, self.block_table,
                                      self.seq_lens, k_scale=self.layer.k_scale,
                                      v_scale=self.layer.v_scale, out=out, **kw)

    def ref(self):
        return paged_attention_ref(self.q, self.layer.key, self.layer.value, self.block_table,
                                   self.seq_lens, k_scale=self.layer.k_scale,
                                   v_scale=self.layer.v_scale)
