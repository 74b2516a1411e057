"""Paged-attention decode and reshape_and_cache against the plain PyTorch reference.

Runs on a GPU when there is one, else on CPU through Triton's interpreter (set below,
before Triton is first imported). Edge cases use tiny batches and head counts because
the interpreter is slow; each check compares ``||out - ref|| / ||ref||`` against a
tolerance per dtype, on fresh random data, with the output poisoned (NaN) beforehand
so an unwritten element fails.
"""

from __future__ import annotations

import os

torch = __import__("pytest").importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402

pytest.importorskip("triton")

from kvpilot.worker.kernels import cache as kv_cache  # noqa: E402
from kvpilot.worker.kernels.paged_attention import (  # noqa: E402
    DecodeConfig,
    choose_num_splits,
    default_config,
    paged_attention_decode,
    programs_per_sm,
)
from kvpilot.worker.kernels.cpu import (  # noqa: E402
    FP8_DTYPE,
    dequantize,
    gather_sequence,
    paged_attention as paged_attention_ref,
    quantize_fp8,
    reshape_and_cache as reshape_and_cache_ref,
)
from tests.kernel_helpers import DEVICE, FP8_TOL, TOL, World, rel_err  # noqa: E402

FP8_VS_ORIGINAL_TOL = 6e-2  # against the unquantized values (see FP8_TOL)


# ---- lengths that are not multiples of the page, with and without splits --------------
# Both forms of the products (S = Q K^T, or swapped: S^T = K Q^T) on every case below.
PRODUCTS = [DecodeConfig(64, 4, 3), DecodeConfig(64, 4, 3, swap=True)]


@pytest.mark.parametrize("config", PRODUCTS, ids=["qk", "swapped"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_lengths_not_multiple_of_page(num_splits, config):
    w = World([1, 15, 17, 1025, 1027], kv_heads=1, group=4, head_dim=64, page_size=16,
              dtype=torch.bfloat16, seed=num_splits)
    assert rel_err(w.run(num_splits=num_splits, config=config), w.ref()) < TOL[torch.bfloat16]


# ---- GQA ratios x head dims x dtypes ---------------------------------------------------
@pytest.mark.parametrize("config", PRODUCTS, ids=["qk", "swapped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_and_head_dims(group, head_dim, dtype, config):
    w = World([70, 33], kv_heads=2, group=group, head_dim=head_dim, page_size=16, dtype=dtype,
              seed=group * head_dim)
    assert rel_err(w.run(num_splits=2, config=config), w.ref()) < TOL[dtype]


def test_peaked_softmax_is_stable():
    # Large scores: one token dominates; the running max must keep exp2 in range.
    w = World([300], kv_heads=1, group=4, head_dim=64, page_size=16, dtype=torch.float16,
              seed=7, q_scale=30.0)
    assert rel_err(w.run(num_splits=3), w.ref()) < TOL[torch.float16]


# ---- page sizes ------------------------------------------------------------------------
def _same_kv_in_pages(page_size, lens, seed=3):
    """One fixed set of sequences written into a cache with `page_size`."""
    g = torch.Generator().manual_seed(seed)
    kv_heads, head_dim = 2, 64
    seqs_k = [torch.randn(n, kv_heads, head_dim, generator=g).half() for n in lens]
    seqs_v = [torch.randn(n, kv_heads, head_dim, generator=g).half() for n in lens]
    q = torch.randn(len(lens), kv_heads * 4, head_dim, generator=g).half().to(DEVICE)
    w = World(lens, kv_heads=kv_heads, group=4, head_dim=head_dim, page_size=page_size,
              dtype=torch.float16, seed=seed + page_size)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        pages = w.block_table[b].cpu().long()[pos // page_size]
        idx = (pages.to(DEVICE), (pos % page_size).to(DEVICE))
        w.layer.key[idx] = seqs_k[b].to(DEVICE)
        w.layer.value[idx] = seqs_v[b].to(DEVICE)
    w.q = q
    return w


def test_page_sizes_1_and_16_agree():
    lens = [17, 130]
    w1, w16 = _same_kv_in_pages(1, lens), _same_kv_in_pages(16, lens)
    out1, out16 = w1.run(num_splits=2), w16.run(num_splits=2)
    # Same tiles in the same order: the page size changes addresses, not arithmetic.
    torch.testing.assert_close(out1, out16, atol=1e-3, rtol=1e-3)
    assert rel_err(out16, w16.ref()) < TOL[torch.float16]


@pytest.mark.parametrize("page_size", [7, 128])
def test_odd_and_large_pages(page_size):
    w = World([1, 200], kv_heads=2, group=2, head_dim=64, page_size=page_size,
              dtype=torch.float16, seed=page_size)
    assert rel_err(w.run(num_splits=2), w.ref()) < TOL[torch.float16]


@pytest.mark.parametrize("k_order,v_order,page_size", [
    ("token", "token", 16), ("head", "token", 7), ("token", "head", 128),
])
def test_page_layouts(k_order, v_order, page_size):
    w = World([40, 77, 130], kv_heads=2, group=4, head_dim=64, page_size=page_size,
              dtype=torch.bfloat16, k_order=k_order, v_order=v_order, seed=11)
    assert rel_err(w.run(num_splits=2), w.ref()) < TOL[torch.bfloat16]


# ---- splits: many, empty, and the count heuristic --------------------------------------
def test_more_splits_than_tiles_leaves_empty_splits_harmless():
    # 8 splits over sequences of 1..2 tiles: most splits are empty; no NaN, same answer.
    w = World([1, 65, 5], kv_heads=1, group=4, head_dim=64, page_size=16,
              dtype=torch.float16, seed=5)
    out = w.run(num_splits=8)
    assert rel_err(out, w.ref()) < TOL[torch.float16]
    torch.testing.assert_close(out, w.run(num_splits=1), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_splits", [17, 256])
def test_many_splits_merge_in_one_pass(num_splits):
    # Over 16 splits the merge reads every split at once, a slice of the head per program;
    # 256 (the most there may be) splits of one 1027-token sequence leave most of them empty.
    w = World([1027, 700, 3], kv_heads=2, group=4, head_dim=64, page_size=16,
              dtype=torch.float16, seed=num_splits)
    out = w.run(num_splits=num_splits, config=DecodeConfig(block_n=16, num_warps=1, num_stages=2))
    assert rel_err(out, w.ref()) < TOL[torch.float16]


@pytest.mark.parametrize("max_seq_len", [None, 300, 1, 10**6])
def test_length_bound_steers_speed_not_results(max_seq_len):
    # The bound decides where programs read block-table entries before the lengths
    # arrive: right (300, the longest), loose (the table, 10**6) or wrong (1), the
    # result is the same.
    w = World([300, 170, 0, 33], kv_heads=2, group=4, head_dim=64, page_size=16,
              dtype=torch.float16, seed=17)
    for splits in (1, 3):
        out = w.run(num_splits=splits, max_seq_len=max_seq_len)
        assert rel_err(out, w.ref()) < TOL[torch.float16]
        assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_empty_sequence_gives_zeros_not_nan():
    w = World([0, 20], kv_heads=1, group=4, head_dim=64, page_size=16, dtype=torch.float16,
              seed=9)
    for splits in (1, 4):
        out = w.run(num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert rel_err(out[1], w.ref()[1]) < TOL[torch.float16]


def test_small_block_config():
    w = World([100], kv_heads=1, group=8, head_dim=64, page_size=16, dtype=torch.bfloat16,
              seed=13)
    cfg = DecodeConfig(block_n=16, num_warps=2, num_stages=1)
    assert rel_err(w.run(num_splits=3, config=cfg), w.ref()) < TOL[torch.bfloat16]


def test_choose_num_splits():
    # Llama-3-8B (8 KV heads) on 132 SMs x 2 programs = 264 slots, tiles of 64 tokens.
    assert choose_num_splits(1 * 8, 32768, 64, 264) == 32      # one wave of 16-tile splits
    assert choose_num_splits(1 * 8, 32768, 16, 1056) == 128    # FP8, 8 per SM: 132 fit, 4 empty
    assert choose_num_splits(1 * 8, 131072, 64, 264) == 33     # 63 tiles each, the last 32
    assert choose_num_splits(16 * 8, 32768, 64, 264) == 2      # 256 programs, not 384
    assert choose_num_splits(32 * 8, 4096, 64, 264) == 1       # 256 programs already
    assert choose_num_splits(128 * 8, 1024, 64, 264) == 1      # the batch fills the GPU
    assert choose_num_splits(1 * 8, 100, 64, 264) == 1         # 2 tiles: too short to split
    assert choose_num_splits(1, 10**7, 16, 528) == 256         # MAX_SPLITS


def test_programs_per_sm():
    assert programs_per_sm(128, 39168, 4) == 4   # registers: 16 warps of 128 per thread
    assert programs_per_sm(189, 74240, 4) == 2   # 24 x 256 registers a warp -> 10 warps
    assert programs_per_sm(32, 100_000, 4) == 2  # shared memory
    assert programs_per_sm(16, 0, 1) == 32       # the per-SM program limit


def test_default_config_by_units():
    bf16, fp8 = torch.bfloat16, FP8_DTYPE
    assert default_config(bf16, 128, 8, 132) == DecodeConfig(64, 4, 4)    # one long sequence
    assert default_config(bf16, 128, 8, 132, None, (9, 0)) == DecodeConfig(64, 4, 3, swap=True)
    assert default_config(bf16, 128, 8, 108, None, (8, 0)) == DecodeConfig(64, 4, 4)  # A100
    assert default_config(bf16, 128, 512, 132) == DecodeConfig(32, 1, 4)  # many short ones
    assert default_config(bf16, 128, 256, 132) == DecodeConfig(64, 4, 3)  # 1-2 units per SM
    assert default_config(bf16, 128, 64, 132) == DecodeConfig(32, 1, 4)   # 1/4-1/2 per SM
    assert default_config(bf16, 128, 128, 132) == DecodeConfig(64, 4, 4)
    assert default_config(bf16, 256, 512, 132) == DecodeConfig(32, 4, 4)  # wide heads
    assert default_config(fp8, 128, 8, 132) == DecodeConfig(32, 1, 3)    # memory rate unknown
    assert default_config(fp8, 128, 8, 132, 25.4e9) == DecodeConfig(16, 1, 3, convert_v=True)
    assert default_config(fp8, 128, 8, 132, 36.4e9) == DecodeConfig(32, 1, 3)  # H200-like
    assert default_config(fp8, 256, 8, 132) == DecodeConfig(32, 2, 3)


# ---- FP8 KV ----------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_against_dequantized_reference(per_head):
    w = World([1, 17, 300], kv_heads=2, group=4, head_dim=128, page_size=16, dtype=FP8_DTYPE,
              seed=21 + per_head)
    if per_head:
        # Different scales per head: a head that used the wrong scale would be off by 2-4x.
        heads = torch.tensor([1.0, 3.0], device=DEVICE)
        k_true, v_true = w.k_full * heads[:, None], w.v_full * heads.flip(0)[:, None]
        w.layer.k_scale = (k_true.abs().amax(dim=(0, 1, 3)) / 448.0).float()
        w.layer.v_scale = (v_true.abs().amax(dim=(0, 1, 3)) / 448.0).float()
        w.layer.key.copy_(quantize_fp8(k_true, w.layer.k_scale))
        w.layer.value.copy_(quantize_fp8(v_true, w.layer.v_scale))
    else:
        k_true, v_true = w.k_full, w.v_full
    # Both ways of converting V (by hand, on GPUs where memory is slow for the SMs; by
    # the compiler elsewhere) and both FP8 tile sizes.
    for cfg in (DecodeConfig(16, 1, 3, convert_v=True), DecodeConfig(32, 1, 3)):
        assert rel_err(w.run(num_splits=2, config=cfg), w.ref()) < FP8_TOL
    out = w.run(num_splits=2)
    assert rel_err(out, w.ref()) < FP8_TOL
    # And against attention over the unquantized values: e4m3 rounding only.
    exact = paged_attention_ref(w.q, k_true, v_true, w.block_table, w.seq_lens)
    assert rel_err(out, exact) < FP8_VS_ORIGINAL_TOL


# ---- reshape_and_cache -------------------------------------------------------------------
@pytest.mark.parametrize("v_order", ["head", "token"])
@pytest.mark.parametrize("dtype,rounds", [
    (torch.bfloat16, False),
    (FP8_DTYPE, False),
    pytest.param(FP8_DTYPE, True, marks=pytest.mark.skipif(
        DEVICE != "cuda", reason="the interpreter's float downcast misrounds "
                                 "(triton-lang/triton#8322); the device cast is checked")),
])
def test_reshape_and_cache_matches_reference(dtype, rounds, v_order):
    g = torch.Generator().manual_seed(31)
    kv_heads, head_dim, page_size, num_pages, tokens = 3, 64, 16, 6, 9
    layer = kv_cache.allocate_layer(num_pages, page_size, kv_heads, head_dim, dtype, DEVICE,
                                    v_order=v_order, per_head_scales=True)
    heads = torch.ones(kv_heads, 1, device=DEVICE)
    if layer.is_fp8:
        # Powers of two, so that a value already on the e4m3 grid divides exactly.
        layer.k_scale.copy_(torch.tensor([2.0**-7, 2.0**-6, 2.0**-8]))
        layer.v_scale.copy_(torch.tensor([2.0**-6, 2.0**-7, 2.0**-9]))
        heads = layer.k_scale[:, None]
    fill = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=g).to(DEVICE)
    layer.key.copy_(fill.to(dtype))
    layer.value.copy_((-fill).to(dtype))
    ref_k, ref_v = layer.key.clone(), layer.value.clone()
    key = 50 * torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE)
    value = 50 * torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE)
    if not rounds:
        # Values on the cache's grid: the write is exact in any mode, so this checks
        # placement, scales and saturation without depending on a rounding routine.
        key = (key / heads).clamp(-448, 448).to(dtype).float() * heads
        value = (value / heads).clamp(-448, 448).to(dtype).float() * heads
        if layer.is_fp8:
            value = value / layer.k_scale[:, None] * layer.v_scale[:, None]
    key, value = key.bfloat16(), value.bfloat16()
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens].to(DEVICE)
    slots[4] = -1  # padding token: written nowhere
    kv_cache.reshape_and_cache(key, value, layer, slots)
    reshape_and_cache_ref(key, value, ref_k, ref_v, slots, layer.k_scale, layer.v_scale)
    # Bit-exact: both round the same float32 value to the cache dtype (nearest even).
    bits = torch.uint8 if dtype == FP8_DTYPE else torch.int16
    assert torch.equal(layer.key.contiguous().view(bits), ref_k.contiguous().view(bits))
    assert torch.equal(layer.value.contiguous().view(bits), ref_v.contiguous().view(bits))


def test_fp8_saturates_instead_of_nan():
    layer = kv_cache.allocate_layer(2, 4, 1, 16, FP8_DTYPE, DEVICE)
    key = torch.full((2, 1, 16), 1e4, dtype=torch.bfloat16, device=DEVICE)
    key[1] = -1e4
    kv_cache.reshape_and_cache(key, key, layer, torch.tensor([0, 5], device=DEVICE))
    vals = layer.key.float()
    assert vals[0, 0].eq(448.0).all() and vals[1, 1].eq(-448.0).all()


def test_cache_then_decode_end_to_end():
    # Prefill three sequences token by token through reshape_and_cache, then decode.
    g = torch.Generator().manual_seed(41)
    lens, kv_heads, group, head_dim, page_size = [5, 33, 18], 2, 4, 64, 16
    pages_needed = sum(-(-n // page_size) for n in lens)
    layer = kv_cache.allocate_layer(pages_needed + 2, page_size, kv_heads, head_dim,
                                    torch.bfloat16, DEVICE)
    layer.key.fill_(float("nan"))  # unwritten slots must never be read
    layer.value.fill_(float("nan"))
    perm = torch.randperm(pages_needed + 2, generator=g)
    table = torch.zeros(len(lens), 3, dtype=torch.int32)
    taken = 0
    for b, n in enumerate(lens):
        k = -(-n // page_size)
        table[b, :k] = perm[taken:taken + k].to(torch.int32)
        taken += k
    table = table.to(DEVICE)
    ks, vs = [], []
    for pos in range(max(lens)):
        rows = [b for b, n in enumerate(lens) if pos < n]
        key = torch.randn(len(rows), kv_heads, head_dim, generator=g).bfloat16().to(DEVICE)
        val = torch.randn(len(rows), kv_heads, head_dim, generator=g).bfloat16().to(DEVICE)
        positions = torch.full((len(lens),), pos, device=DEVICE)
        slots = kv_cache.slot_mapping(table, positions, page_size)[rows]
        kv_cache.reshape_and_cache(key, val, layer, slots)
        ks.append((rows, key))
        vs.append((rows, val))
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=g).bfloat16().to(DEVICE)
    out = paged_attention_decode(q, layer.key, layer.value, table, seq_lens, num_splits=2)
    ref = paged_attention_ref(q, layer.key, layer.value, table, seq_lens)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    # The cache holds exactly what was written, in order.
    for b, n in enumerate(lens):
        got = gather_sequence(layer.key, table[b], n)
        want = torch.stack([key[rows.index(b)] for rows, key in ks[:n]])
        assert torch.equal(got, want)
    assert dequantize(layer.key, None).dtype == torch.float32


# ---- launcher checks ---------------------------------------------------------------------
def test_launcher_rejects_bad_shapes():
    w = World([10], kv_heads=2, group=3, head_dim=64, page_size=16, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention_decode(w.q[:, :5], w.layer.key, w.layer.value, w.block_table, w.seq_lens)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_decode(w.q, w.layer.key, w.layer.value, w.block_table.long(), w.seq_lens)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_decode(w.q.bfloat16(), w.layer.key, w.layer.value, w.block_table,
                               w.seq_lens)
    with pytest.raises(ValueError, match="num_stages >= 2"):
        w.run(config=DecodeConfig(64, 4, 1, swap=True))


# ---- no recompilation per length or split count (compiled kernels only) -----------------
@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter compiles nothing")
def test_lengths_and_split_counts_do_not_recompile():
    from kvpilot.worker.kernels import paged_attention as pa

    def compiled():
        caches = getattr(pa._paged_decode_kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton keeps no per-device kernel cache")
        return sum(len(c[0]) for c in caches.values())

    w = World([100, 3000], kv_heads=2, group=4, head_dim=64, page_size=16, dtype=torch.bfloat16)
    w.run(num_splits=2)
    w.run(num_splits=1)  # the two variants: with and without splits
    before = compiled()
    for lens, splits in (([5, 17], 3), ([1, 2999], 7), ([999, 1], 16), ([3000, 64], 1)):
        w.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        assert rel_err(w.run(num_splits=splits), w.ref()) < TOL[torch.bfloat16]
    assert compiled() == before

