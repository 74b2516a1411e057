"""The Triton kernels at every head dimension the worker serves (64, 80, 96, 128, 256;
80 and 96 in a tile padded to 128 and masked): paged decode, with and without splits
and swapped products, ``reshape_and_cache`` and in-place RoPE, against their PyTorch
references. On CPU through Triton's interpreter (small shapes: it is slow); the
``gpu``-marked variants run the compiled kernels in bf16 and FP8 (the engine of each
family on a GPU is in ``test_worker_families.py``)."""

from __future__ import annotations

import os

torch = __import__("pytest").importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402

pytest.importorskip("triton")

from kvpilot.api.support import WORKER_HEAD_DIMS  # noqa: E402
from kvpilot.worker.kernels import cache as kv_cache  # noqa: E402
from kvpilot.worker.kernels import fused  # noqa: E402
from kvpilot.worker.kernels.paged_attention import (  # noqa: E402
    HEAD_DIMS,
    DecodeConfig,
)
from kvpilot.worker.kernels.cpu import FP8_DTYPE  # noqa: E402
from kvpilot.worker.kernels.cpu import reshape_and_cache as reshape_and_cache_ref  # noqa: E402
from tests.kernel_helpers import FP8_TOL, TOL, World, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SERVED = [64, 80, 96, 128, 256]


def test_support_states_the_kernels_head_dims():
    assert WORKER_HEAD_DIMS == HEAD_DIMS
    assert set(SERVED) <= set(HEAD_DIMS)


# ---- paged decode ------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim", SERVED)
def test_decode_matches_the_reference(head_dim, num_splits):
    # 17 and 40: a partial last tile and a partial last page; 3 splits go through the merge.
    w = World([1, 17, 40], kv_heads=1, group=2, head_dim=head_dim, page_size=16,
              dtype=torch.float16, seed=head_dim + num_splits)
    out = w.run(num_splits=num_splits, config=DecodeConfig(32, 4, 2))
    assert rel_err(out, w.ref()) < TOL[torch.float16]


@pytest.mark.parametrize("head_dim", [80, 96])
def test_padded_head_dims_in_the_swapped_products_and_a_wide_merge(head_dim):
    # Swapped: whole tiles go through S^T = K Q^T. 20 splits: the merge reads 16-wide
    # slices of the head (80 and 96 are whole slices).
    w = World([130, 64], kv_heads=2, group=4, head_dim=head_dim, page_size=16,
              dtype=torch.float16, seed=head_dim)
    ref = w.ref()
    assert rel_err(w.run(num_splits=1, config=DecodeConfig(64, 4, 3, swap=True)), ref) < 2e-3
    assert rel_err(w.run(num_splits=20, config=DecodeConfig(16, 1, 2)), ref) < 2e-3


def test_fp8_cache_at_head_dim_96():
    w = World([33, 5], kv_heads=1, group=2, head_dim=96, page_size=16, dtype=FP8_DTYPE, seed=5)
    assert rel_err(w.run(num_splits=2, config=DecodeConfig(16, 1, 2)), w.ref()) < FP8_TOL


def test_other_head_dims_are_refused():
    w = World([5], kv_heads=1, group=1, head_dim=112, page_size=16, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim must be one of 16, 32, 64, 80, 96, 128, 256"):
        w.run()


# ---- the writes and RoPE ---------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", SERVED)
def test_reshape_and_cache_matches_the_reference(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    tokens, kv_heads, pages, page_size = 5, 3, 4, 4
    key, value = (torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE)
                  for _ in range(2))
    slots = torch.tensor([3, 0, -1, 14, 9], device=DEVICE)
    layer = kv_cache.allocate_layer(pages, page_size, kv_heads, head_dim, torch.float16, DEVICE)
    layer.key.fill_(7.0)  # what is not written stays
    layer.value.fill_(7.0)
    want_k, want_v = layer.key.clone(), layer.value.clone()
    kv_cache.reshape_and_cache(key.half(), value.half(), layer, slots)
    reshape_and_cache_ref(key.half(), value.half(), want_k, want_v, slots)
    assert torch.equal(layer.key, want_k) and torch.equal(layer.value, want_v)


@pytest.mark.parametrize("head_dim", SERVED)
def test_rope_matches_the_reference(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    tokens, q_heads, kv_heads = 3, 4, 2
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE)
    angles = torch.outer(torch.arange(32).float(), torch.rand(head_dim // 2, generator=g))
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    pos = torch.tensor([0, 31, 7], device=DEVICE)

    def views(t):
        return (t[:, :q_heads * head_dim].view(tokens, q_heads, head_dim),
                t[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(
                    tokens, kv_heads, head_dim))

    mine, ref = qkv.clone(), qkv.clone()
    fused.rope_(*views(mine), pos, cos, sin)
    fused.rope_ref_(*views(ref), pos, cos, sin)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)  # v untouched as well


# ---- GPU: the compiled kernels, bf16 and FP8 ------------------------------------------------
# Launch shapes per cache dtype: the default for the GPU, then the forced ones (head
# dims above 128 keep the default: their register and shared-memory budget differs).
GPU_CONFIGS = [
    (torch.bfloat16, None), (torch.bfloat16, DecodeConfig(64, 4, 3)),
    (torch.bfloat16, DecodeConfig(64, 4, 3, swap=True)), (torch.bfloat16, DecodeConfig(32, 1, 4)),
    (FP8_DTYPE, None), (FP8_DTYPE, DecodeConfig(16, 1, 3, convert_v=True)),
    (FP8_DTYPE, DecodeConfig(32, 1, 3)),
]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_splits", [None, 1, 7, 40])
@pytest.mark.parametrize("dtype, config", GPU_CONFIGS,
                         ids=["bf16", "bf16-qk", "bf16-swapped", "bf16-32", "fp8", "fp8-cvt",
                              "fp8-32"])
@pytest.mark.parametrize("head_dim", SERVED)
def test_gpu_decode_at_every_head_dim(head_dim, dtype, config, num_splits):
    if head_dim > 128 and config is not None:
        pytest.skip("head dims above 128 run the default shape")
    w = World([1, 15, 17, 1025, 1027, 4000], kv_heads=2, group=4, head_dim=head_dim,
              page_size=16, dtype=dtype, seed=head_dim)
    tol = FP8_TOL if dtype == FP8_DTYPE else TOL[torch.bfloat16]
    assert rel_err(w.run(num_splits=num_splits, config=config), w.ref()) < tol


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", SERVED)
def test_gpu_rope_and_fp8_writes(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    tokens, heads = 9, 4
    x = torch.randn(tokens, 2 * heads, head_dim, generator=g).to("cuda", torch.bfloat16)
    angles = torch.outer(torch.arange(64).float(), torch.rand(head_dim // 2, generator=g))
    cos, sin = angles.cos().cuda(), angles.sin().cuda()
    pos = torch.randint(0, 64, (tokens,), generator=g).cuda()
    mine, ref = x.clone(), x.clone()
    fused.rope_(mine[:, :heads], mine[:, heads:], pos, cos, sin)
    fused.rope_ref_(ref[:, :heads], ref[:, heads:], pos, cos, sin)
    torch.testing.assert_close(mine, ref, rtol=2e-2, atol=2e-2)
    layer = kv_cache.allocate_layer(4, 16, heads, head_dim, FP8_DTYPE, "cuda")
    layer.k_scale.fill_(0.05)
    layer.v_scale.fill_(0.05)
    want_k, want_v = layer.key.clone(), layer.value.clone()
    slots = torch.tensor([0, 17, 63, -1, 5, 6, 40, 41, 2], device="cuda")
    k, v = mine[:, :heads], mine[:, heads:]
    kv_cache.reshape_and_cache(k, v, layer, slots)
    reshape_and_cache_ref(k, v, want_k, want_v, slots, layer.k_scale, layer.v_scale)
    assert torch.equal(layer.key.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(layer.value.view(torch.uint8), want_v.view(torch.uint8))
