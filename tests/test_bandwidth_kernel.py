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

from kvpilot.worker.kernels.bandwidth import stream_read  # noqa: E402

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
