"""The fused elementwise kernels of the Llama layer against their PyTorch references.

On a GPU when there is one, else on CPU through Triton's interpreter (set before Triton
is first imported), on tiny shapes with sizes that are not powers of two.
"""

from __future__ import annotations

import os

torch = __import__("pytest").importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402

pytest.importorskip("triton")

from kvpilot.worker.kernels import fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, with_residual):
    x = randn(5, 48, dtype=dtype)
    res = randn(5, 48, dtype=dtype, seed=1) if with_residual else None
    w = randn(48, dtype=dtype, seed=2)
    out, new_res = fused.add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = fused.add_rms_norm_ref(x, res, w, 1e-5)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(new_res, ref_res, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    x = randn(3, 2 * 1100, dtype=dtype)  # more than one 1024-wide block per row
    torch.testing.assert_close(fused.silu_mul(x), fused.silu_mul_ref(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_views_of_the_fused_qkv(dtype):
    tokens, q_heads, kv_heads, d = 4, 6, 2, 16
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * d, dtype=dtype)
    angles = torch.outer(torch.arange(64).float(), torch.rand(d // 2, generator=torch.Generator().manual_seed(3)))
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    pos = torch.tensor([0, 5, 63, 17], device=DEVICE)

    def views(t):
        return (t[:, :q_heads * d].view(tokens, q_heads, d),
                t[:, q_heads * d:(q_heads + kv_heads) * d].view(tokens, kv_heads, d))

    mine, ref = qkv.clone(), qkv.clone()
    fused.rope_(*views(mine), pos, cos, sin)
    fused.rope_ref_(*views(ref), pos, cos, sin)
    torch.testing.assert_close(mine, ref, **TOL[dtype])
    # v (the rest of the row) is untouched.
    assert torch.equal(mine[:, (q_heads + kv_heads) * d:], qkv[:, (q_heads + kv_heads) * d:])
    assert not torch.equal(mine, qkv)
