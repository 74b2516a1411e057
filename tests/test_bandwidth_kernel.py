"""The streaming-read kernel behind the benchmark's bandwidth ceiling reads every element.

Runs on a GPU when there is one, else through Triton's interpreter (set before Triton
is first imported).
"""

from __future__ import annotations

import os

torch = __import__("pytest").importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402

pytest.importorskip("triton")

from kvpilot.worker.kernels.bandwidth import paged_read, stream_read  # noqa: E402
from kvpilot.worker.kernels.cache import allocate_pages  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tma", [False, True])
def test_stream_read_sums_every_element(tma):
    if tma and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the tensor-memory accelerator needs a Hopper GPU")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024 * 20, generator=g).to(DEVICE)
    out = torch.full((3,), float("nan"), device=DEVICE)  # 3 programs, uneven share of blocks
    stream_read(x, out, block=1024, num_warps=4, tma=tma)
    torch.testing.assert_close(out.sum().cpu(), x.sum().cpu(), rtol=1e-4, atol=1e-3)
    # Program p read blocks p, p+3, p+6, ...
    blocks = x.view(20, 1024).sum(1).cpu()
    torch.testing.assert_close(out.cpu(), torch.stack([blocks[p::3].sum() for p in range(3)]),
                               rtol=1e-4, atol=1e-3)


def test_stream_read_rejects_ragged_input():
    with pytest.raises(ValueError, match="multiple of block"):
        stream_read(torch.zeros(1000, device=DEVICE), torch.empty(1, device=DEVICE), block=1024)


@pytest.mark.parametrize("order", ["head", "token"])
@pytest.mark.parametrize("num_splits,step", [(1, 4), (3, 1), (2, 2)])
def test_paged_read_sums_the_pages_each_sequence_occupies(num_splits, step, order):
    g = torch.Generator().manual_seed(num_splits)
    page, heads, dim, num_pages = 16, 2, 32, 12
    k = allocate_pages(num_pages, page, heads, dim, torch.bfloat16, DEVICE, order=order)
    v = allocate_pages(num_pages, page, heads, dim, torch.bfloat16, DEVICE, order=order)
    k.copy_(torch.randn(k.shape, generator=g))
    v.copy_(torch.randn(v.shape, generator=g))
    lens = [1, 40, 17, 100]
    table = torch.randint(0, num_pages, (4, 8), generator=g, dtype=torch.int32)  # stale ids
    table[0, :1] = torch.tensor([7])
    table[1, :3] = torch.tensor([2, 9, 0])
    table[2, :2] = torch.tensor([11, 4])
    table[3, :7] = torch.tensor([1, 3, 5, 6, 8, 10, 2])
    out = torch.full((4 * heads * num_splits,), float("nan"), device=DEVICE)
    paged_read(k, v, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE), out,
               num_splits=num_splits, pages_per_step=step)
    kv = (k.float() + v.float()).cpu()
    want = torch.stack([torch.stack([kv[table[b, :-(-n // page)].long(), :, h].sum()
                                     for h in range(heads)]) for b, n in enumerate(lens)])
    got = out.view(4, heads, num_splits).sum(-1).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)


def test_paged_read_rejects_odd_pages():
    k = allocate_pages(4, 12, 2, 32, torch.bfloat16, DEVICE)
    with pytest.raises(ValueError, match="powers of two"):
        paged_read(k, k, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                   torch.ones(1, dtype=torch.int32, device=DEVICE), torch.empty(2, device=DEVICE))
