"""Sliding-window and soft-capped paged decode (Mistral v0.1, Phi-3, Gemma 2/3) against
the PyTorch reference: windows shorter than a tile, across tile and page edges and longer
than the sequence, with and without splits, bf16/fp16 and FP8, and a page table that is
a ring of pages repeated (``kvpilot.worker.block_manager``'s window pools), whose slots
before the window hold other tokens or NaN: they must never be read. On CPU through
Triton's interpreter; compiled on a GPU."""

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
    paged_attention_decode,
    plan_num_splits,
)
from kvpilot.worker.kernels.cpu import (  # noqa: E402
    FP8_DTYPE,
    paged_attention as paged_attention_ref,
)
from tests.kernel_helpers import FP8_TOL, TOL, World, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(w: World, **kw):
    out = w.run(**kw)
    ref = paged_attention_ref(w.q, w.layer.key, w.layer.value, w.block_table, w.seq_lens,
                              k_scale=w.layer.k_scale, v_scale=w.layer.v_scale,
                              window=kw.get("window"), softcap=kw.get("softcap"))
    return out, ref


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 7, 16, 33, 500])
def test_window_matches_the_reference(window, num_splits):
    # 1: only the query's own token; 7 and 33: the window starts inside a tile and a page;
    # 16: on a page edge; 500: longer than every sequence (no token dropped).
    w = World([1, 17, 40, 95], kv_heads=2, group=2, head_dim=64, page_size=16,
              dtype=torch.float16, seed=window + num_splits)
    out, ref = _run(w, window=window, num_splits=num_splits, config=DecodeConfig(32, 4, 2))
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("head_dim", [96, 256])
def test_window_and_softcap_at_gemma_and_phi_head_dims(head_dim):
    w = World([70, 33], kv_heads=1, group=4, head_dim=head_dim, page_size=16,
              dtype=torch.float16, seed=head_dim, q_scale=4.0)
    out, ref = _run(w, window=20, softcap=5.0, num_splits=2, config=DecodeConfig(16, 2, 2))
    assert rel_err(out, ref) < TOL[torch.float16]


def test_softcap_changes_peaked_scores_and_matches_the_reference():
    # Large queries: scores beyond the cap, where tanh bends them.
    w = World([40, 9], kv_heads=2, group=2, head_dim=64, page_size=16, dtype=torch.float16,
              seed=5, q_scale=8.0)
    out, ref = _run(w, softcap=2.0, num_splits=1, config=DecodeConfig(32, 4, 2))
    assert rel_err(out, ref) < TOL[torch.float16]
    assert rel_err(w.run(num_splits=1, config=DecodeConfig(32, 4, 2)), ref) > 0.05


def test_window_in_fp8():
    w = World([50, 18], kv_heads=2, group=2, head_dim=64, page_size=16, dtype=FP8_DTYPE,
              seed=11)
    out, ref = _run(w, window=21, num_splits=2, config=DecodeConfig(16, 1, 2))
    assert rel_err(out, ref) < FP8_TOL


def test_a_default_launch_in_a_window_turns_the_swapped_products_off():
    w = World([130, 64], kv_heads=2, group=4, head_dim=128, page_size=16,
              dtype=torch.float16, seed=2)
    out, ref = _run(w, window=70, config=DecodeConfig(64, 4, 3, swap=True), num_splits=1)
    assert rel_err(out, ref) < TOL[torch.float16]
    # Splits are planned for what a window reads, not for the table's length.
    q, table = w.q, w.block_table
    assert (plan_num_splits(q, w.layer.key, table, max_seq_len=10**6, window=70)
            <= plan_num_splits(q, w.layer.key, table, max_seq_len=10**6))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_a_ring_of_pages_is_read_only_inside_the_window(num_splits):
    """A sequence of 150 tokens in a ring of 3 pages of 16 (a window of 40 fits in 48
    slots): the table repeats the ring, so positions before the window map to slots now
    holding later tokens. The kernel must give the window's attention exactly, and a
    NaN written to every slot outside the window must not reach the output."""
    page_size, window, n, ring = 16, 40, 150, [5, 2, 7]
    kv_heads, head_dim, group = 2, 64, 2
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, kv_heads, head_dim, generator=g)
    values = torch.randn(n, kv_heads, head_dim, generator=g)
    layer = kv_cache.allocate_layer(9, page_size, kv_heads, head_dim, torch.float16, DEVICE)
    layer.key.fill_(float("nan"))
    layer.value.fill_(float("nan"))
    slots_total = len(ring) * page_size
    table = torch.tensor([[ring[i % len(ring)] for i in range(-(-n // page_size))]],
                         dtype=torch.int32)
    for pos in range(n - window, n):  # what a ring holds of the window
        page, slot = ring[(pos % slots_total) // page_size], pos % page_size
        layer.key[page, slot] = keys[pos].to(DEVICE, torch.float16)
        layer.value[page, slot] = values[pos].to(DEVICE, torch.float16)
    q = torch.randn(1, kv_heads * group, head_dim, generator=g).to(DEVICE, torch.float16)
    lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    out = paged_attention_decode(q, layer.key, layer.value, table.to(DEVICE), lens,
                                 window=window, num_splits=num_splits,
                                 config=DecodeConfig(16, 2, 2))
    # The same window, contiguous: no ring, no NaN anywhere.
    flat = kv_cache.allocate_layer(3, page_size, kv_heads, head_dim, torch.float16, DEVICE)
    for i, pos in enumerate(range(n - window, n)):
        flat.key[i // page_size, i % page_size] = keys[pos].to(DEVICE, torch.float16)
        flat.value[i // page_size, i % page_size] = values[pos].to(DEVICE, torch.float16)
    ref = paged_attention_ref(q, flat.key, flat.value,
                              torch.tensor([[0, 1, 2]], dtype=torch.int32, device=DEVICE),
                              torch.tensor([window], dtype=torch.int32, device=DEVICE))
    assert rel_err(out, ref) < TOL[torch.float16]


def test_launcher_rejects_a_bad_window_or_cap():
    w = World([5], kv_heads=1, group=1, head_dim=64, page_size=16, dtype=torch.float16)
    with pytest.raises(ValueError, match="window"):
        w.run(window=0)
    with pytest.raises(ValueError, match="softcap"):
        w.run(softcap=0.0)
