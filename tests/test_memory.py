"""The memory model against figures computed by hand."""

from __future__ import annotations

import pytest

from kvpilot.api.fleet import Fleet
from kvpilot.api.gpus import (
    CATALOG, LABEL_BANDWIDTH_GBPS, LABEL_BF16_TFLOPS, GPUProduct, gpu_facts, label_overrides,
)
from kvpilot.api.memory import (
    decode_fixed_seconds, decode_step_bytes, decode_step_seconds, itl_step_bytes,
    kv_bytes_per_token, kv_capacity_tokens, parameter_count, prefill_flops, prefill_seconds,
    replica_budget, smallest_tp, step_bytes_within, weight_bytes,
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


H100_GPU = CATALOG["NVIDIA-H100-80GB-HBM3"]


def test_catalog_bandwidth_and_flops():
    facts = {name: (p.hbm_bandwidth, p.bf16_flops) for name, p in CATALOG.items()}
    assert facts == {
        "NVIDIA-H200": (4_800_000_000_000, 989 * 10**12),
        "NVIDIA-H100-80GB-HBM3": (3_350_000_000_000, 989 * 10**12),
        "NVIDIA-A100-SXM4-80GB": (2_039_000_000_000, 312 * 10**12),
        "NVIDIA-A100-SXM4-40GB": (1_555_000_000_000, 312 * 10**12),
        "NVIDIA-L40S": (864_000_000_000, 362 * 10**12),
        "NVIDIA-L4": (300_000_000_000, 121 * 10**12),
    }


def test_node_facts_override_the_catalog_and_fill_unknown_products():
    assert gpu_facts("NVIDIA-L4", 23034) == CATALOG["NVIDIA-L4"]
    assert gpu_facts("NVIDIA-L4", 20000, bandwidth_gbps=250) == GPUProduct(
        "NVIDIA-L4", 20000, 250, 121)
    assert gpu_facts("ACME-X1", 65536) == GPUProduct("ACME-X1", 65536, None, None)
    assert gpu_facts("ACME-X1", 65536, 2000, 400).hbm_bandwidth == 2 * 10**12
    labels = {LABEL_BANDWIDTH_GBPS: "2000", LABEL_BF16_TFLOPS: "fast"}
    assert label_overrides(labels) == (2000, None)
    assert label_overrides({LABEL_BANDWIDTH_GBPS: "0"}) == (None, None)
    assert label_overrides({}) == (None, None)


def test_fleet_file_states_bandwidth_for_an_unknown_product():
    fleet = Fleet.model_validate({"nodes": [
        {"name": "x", "product": "ACME-X1", "memoryMiB": 65536, "gpus": 4,
         "bandwidthGBps": 2000, "bf16TFLOPS": 400},
        {"name": "l4", "product": "NVIDIA-L4", "gpus": 1},
    ]})
    x, l4 = fleet.expand()
    assert x.gpu == GPUProduct("ACME-X1", 65536, 2000, 400)
    assert x.gfd_labels()[LABEL_BANDWIDTH_GBPS] == "2000"
    assert x.gfd_labels()[LABEL_BF16_TFLOPS] == "400"
    assert l4.gpu == CATALOG["NVIDIA-L4"] and LABEL_BANDWIDTH_GBPS not in l4.gfd_labels()


def test_decode_step_bytes_llama3_8b():
    spec = ModelSpec.model_validate(llama_spec())
    # weights 16060522496 + 128 KiB x 16 sequences x 8192 tokens (16 GiB)
    assert decode_step_bytes(spec, 1) == 16060522496 + 16 * GiB == 33240391680
    # TP 2: half the weights, half the KV heads
    assert decode_step_bytes(spec, 2) == 8030261248 + 8 * GiB
    # a lighter load: 4 sequences of 1,000 tokens
    assert decode_step_bytes(spec, 1, sequences=4, context_tokens=1000) == (
        16060522496 + 131072 * 4000)
    assert decode_step_bytes(spec, 1, sequences=0) == 16060522496


def test_decode_step_seconds_on_h100():
    spec = ModelSpec.model_validate(llama_spec())
    # 33240391680 bytes at 3350 GB/s x 0.85 = 11.67 ms, plus the 2 ms fixed cost
    seconds = decode_step_seconds(33240391680, H100_GPU)
    assert seconds == 33240391680 / (3350e9 * 0.85) + 0.002
    assert round(seconds * 1000, 3) == 13.674
    assert decode_fixed_seconds(spec, 1) == 0.002
    # TP 2: two all-reduces per layer of 10 us each, 32 layers
    assert decode_fixed_seconds(spec, 2) == 0.002 + 64 * 10e-6
    with pytest.raises(ValueError, match="bandwidth of ACME-X1 is unknown"):
        decode_step_seconds(1, GPUProduct("ACME-X1", 1024))


def test_step_bytes_within_inverts_step_seconds():
    within = step_bytes_within(0.05, H100_GPU)
    # (50 ms - 2 ms) x 2.8475 TB/s = 136.68 GB, rounded down
    assert abs(within - 136_680_000_000) <= 1
    assert decode_step_seconds(within, H100_GPU) <= 0.05 < decode_step_seconds(within + 1, H100_GPU)
    assert step_bytes_within(0.001, H100_GPU) < 0  # the fixed cost alone takes longer


def test_itl_step_bytes_from_the_sla():
    spec = ModelSpec.model_validate(llama_spec())
    assert itl_step_bytes(spec, 1, H100_GPU) is None
    spec = ModelSpec.model_validate(llama_spec(
        sla={"contextTokens": 8192, "concurrentSequences": 16,
             "interTokenLatencyMilliseconds": 20}))
    assert itl_step_bytes(spec, 1, H100_GPU) == step_bytes_within(0.02, H100_GPU, 0.002)
    assert itl_step_bytes(spec, 2, H100_GPU) == step_bytes_within(0.02, H100_GPU, 0.00264)
    # 33.2 GB per step needs 13.7 ms: within 20 ms alone; on an L4 (300 GB/s) 132 ms
    assert decode_step_bytes(spec, 1) <= itl_step_bytes(spec, 1, H100_GPU)
    assert decode_step_bytes(spec, 1) > itl_step_bytes(spec, 1, CATALOG["NVIDIA-L4"])


def test_prefill_estimate():
    spec = ModelSpec.model_validate(llama_spec())
    assert parameter_count(spec) == 8030261248
    # 2 x 8030261248 x 8192 + 2 x 32 layers x 8192^2 x 32 heads x 128
    assert prefill_flops(spec, 8192) == 131567800287232 + 17592186044416
    assert prefill_seconds(spec, 1, H100_GPU) == 149159986331648 / (989e12 * 0.5)
    assert round(prefill_seconds(spec, 1, H100_GPU), 4) == 0.3016
    assert prefill_seconds(spec, 2, H100_GPU, prompt_tokens=1) == (
        (2 * 8030261248 + 2 * 32 * 32 * 128) / (2 * 989e12 * 0.5))
    sized = ModelSpec.model_validate(llama_spec(weights={"bytes": "16Gi", "dtype": "bf16"}))
    assert parameter_count(sized) == 8 * GiB
    with pytest.raises(ValueError, match="FLOP/s of ACME-X1 are unknown"):
        prefill_seconds(spec, 1, GPUProduct("ACME-X1", 1024, 1000))
