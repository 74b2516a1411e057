"""The memory model against figures computed by hand."""

from __future__ import annotations

import pytest

from kvpilot.api.gpus import CATALOG
from kvpilot.api.memory import (
    kv_bytes_per_token, kv_capacity_tokens, replica_budget, smallest_tp, weight_bytes,
)
from kvpilot.api.model import ModelSpec
from tests.conftest import llama_70b, llama_spec

GiB = 2**30
H100 = CATALOG["NVIDIA-H100-80GB-HBM3"].hbm_bytes  # 81559 MiB = 85520809984 bytes
A100_40 = CATALOG["NVIDIA-A100-SXM4-40GB"].hbm_bytes  # 40960 MiB = 42949672960 bytes


def test_llama3_8b_kv_bytes_per_token_is_128_kib():
    spec = ModelSpec.model_validate(llama_spec())
    assert kv_bytes_per_token(spec.architecture, "bf16") == 128 * 1024
    assert kv_bytes_per_token(spec.architecture, "fp8") == 64 * 1024
    assert kv_bytes_per_token(spec.architecture, "bf16", tp=2) == 64 * 1024


def test_llama3_8b_budget_at_tp1_and_tp2():
    spec = ModelSpec.model_validate(llama_spec())
    assert weight_bytes(spec) == 16060522496  # 8030261248 x 2
    b1 = replica_budget(spec, 1)
    assert b1.kv_cache == 16 * GiB  # 8192 tokens x 16 sequences x 128 KiB
    assert b1.overhead == 2 * GiB
    assert b1.per_gpu == 16060522496 + 16 * GiB + 2 * GiB == 35387875328
    b2 = replica_budget(spec, 2)
    assert (b2.weights, b2.kv_cache) == (8030261248, 8 * GiB)
    assert b2.per_gpu == 18767679488 and b2.total == 2 * 18767679488


def test_llama3_8b_kv_capacity_on_h100():
    spec = ModelSpec.model_validate(llama_spec())
    # (85520809984 - 16060522496 - 2147483648) // 131072
    assert kv_capacity_tokens(spec, 1, H100) == 513555  # 513555.94 rounded down
    assert kv_capacity_tokens(spec, 1, H100, reserve_fraction=0.1) == (
        (int(H100 * 0.9) - 16060522496 - 2 * GiB) // 131072
    )


def test_llama3_70b_at_tp4_and_tp8():
    spec = llama_70b()
    assert kv_bytes_per_token(spec.architecture, "bf16") == 327680  # 320 KiB
    b4, b8 = replica_budget(spec, 4), replica_budget(spec, 8)
    assert (b4.weights, b4.kv_bytes_per_token, b4.kv_cache) == (35276853248, 81920, 5 * GiB)
    assert b4.per_gpu == 42793046016
    assert (b8.weights, b8.kv_bytes_per_token, b8.kv_cache) == (17638426624, 40960, 5 * GiB // 2)
    assert b8.per_gpu == 22470264832


def test_smallest_tp_per_product():
    spec = llama_70b()
    # TP 2 on H100: 70553706496 + 163840 x 65536 + 2 GiB = 83438608384 <= 85520809984
    assert replica_budget(spec, 2).per_gpu == 83438608384
    assert smallest_tp(spec, H100) == 2
    # A100-40GB: TP 4 needs 42793046016 <= 42949672960, TP 2 does not fit
    assert smallest_tp(spec, A100_40) == 4
    assert smallest_tp(spec, A100_40, max_gpus=2) is None
    assert smallest_tp(spec, H100, reserve_fraction=0.05) == 4


def test_fixed_tensor_parallel_is_the_only_candidate():
    spec = llama_70b(tensorParallel=8)
    assert smallest_tp(spec, H100) == 8
    assert smallest_tp(spec, H100, max_gpus=4) is None


def test_kv_heads_are_replicated_beyond_their_count():
    spec = ModelSpec.model_validate(llama_spec(
        architecture={"layers": 32, "attentionHeads": 32, "kvHeads": 2, "headDim": 128,
                      "maxContextTokens": 8192},
    ))
    # TP 8 > 2 KV heads: each GPU still keeps one whole head
    assert replica_budget(spec, 8).kv_bytes_per_token == 2 * 32 * 1 * 128 * 2
    with pytest.raises(ValueError, match="neither divides"):
        replica_budget(spec, 3)


def test_explicit_weight_bytes_override_parameters():
    spec = ModelSpec.model_validate(llama_spec(weights={"parameters": 8030261248, "bytes": "5Gi",
                                                        "dtype": "int4"}))
    assert weight_bytes(spec) == 5 * GiB
    spec = ModelSpec.model_validate(llama_spec(weights={"parameters": 8030261248, "dtype": "int4"}))
    assert weight_bytes(spec) == 4015130624
