"""The memory model for sliding-window, local/global and latent attention, against
figures computed by hand from the example architectures' published configs."""

from __future__ import annotations

import json

import pytest
import yaml

from kvpilot.api.gpus import CATALOG
from kvpilot.api.memory import (
    decode_step_bytes, kv_bytes_per_layer_token, kv_bytes_per_sequence, kv_bytes_per_token,
    local_layers, max_context_within, naive_kv_bytes_per_sequence, replica_budget,
    smallest_tp,
)
from kvpilot.api.model import Architecture, Model, ModelSpec
from kvpilot.cli import main
from tests.conftest import EXAMPLES, llama_spec

GiB = 2**30
H100 = CATALOG["NVIDIA-H100-80GB-HBM3"].hbm_bytes  # 85520809984 bytes
L4 = CATALOG["NVIDIA-L4"].hbm_bytes  # 23034 MiB = 24152899584 bytes
ATTENTION = EXAMPLES / "attention"


def example(name: str) -> ModelSpec:
    return Model.model_validate(yaml.safe_load((ATTENTION / f"{name}.yaml").read_text())).spec


def arch(**fields) -> Architecture:
    base = {"layers": 8, "attentionHeads": 8, "kvHeads": 2, "headDim": 64,
            "maxContextTokens": 65536}
    return Architecture.model_validate({**base, **fields})


MISTRAL = example("mistral-7b-v0.1")
GEMMA2 = example("gemma-2-9b")
GEMMA3 = example("gemma-3-27b")
DEEPSEEK = example("deepseek-v2-lite")
SPECS = {"mistral": MISTRAL, "gemma2": GEMMA2, "gemma3": GEMMA3, "deepseek": DEEPSEEK}


def test_every_attention_example_is_here_and_loads():
    names = sorted(p.stem for p in ATTENTION.glob("*.yaml"))
    assert names == ["deepseek-v2-lite", "gemma-2-9b", "gemma-3-27b", "mistral-7b-v0.1"]


# --- per token ------------------------------------------------------------------------

@pytest.mark.parametrize("name, per_layer, layers, local", [
    # Mistral-7B v0.1: 2 (K, V) x 8 heads x 128 x 2 bytes; every layer local
    ("mistral", 4096, 32, 32),
    # Gemma-2-9B: 2 x 8 x 256 x 2; layers 0, 2, .. 40 local: 21 of 42
    ("gemma2", 8192, 42, 21),
    # Gemma-3-27B: 2 x 16 x 128 x 2; 62 = 10 x (5 local + 1 global) + 2 local: 52 local
    ("gemma3", 8192, 62, 52),
    # DeepSeek-V2-Lite: (512 latent + 64 RoPE key) x 2 bytes, no K/V per head
    ("deepseek", 1152, 27, 0),
])
def test_bytes_per_layer_and_token(name, per_layer, layers, local):
    a = SPECS[name].architecture
    assert kv_bytes_per_layer_token(a, "bf16") == per_layer
    assert kv_bytes_per_layer_token(a, "fp8") == per_layer // 2
    assert a.layers == layers and local_layers(a) == local
    assert kv_bytes_per_token(a, "bf16") == layers * per_layer


def test_naive_formula_per_token_against_the_memory_model():
    # what 2 x layers x kvHeads x headDim x bytes says for one token
    assert naive_kv_bytes_per_sequence(MISTRAL.architecture, "bf16", 1) == 131072  # = model
    assert naive_kv_bytes_per_sequence(GEMMA2.architecture, "bf16", 1) == 344064  # = model
    # DeepSeek-V2-Lite: 2 x 27 x 16 x 192 x 2 = 331776, the latent 27 x 1152 = 31104
    assert naive_kv_bytes_per_sequence(DEEPSEEK.architecture, "bf16", 1) == 331776
    assert kv_bytes_per_token(DEEPSEEK.architecture, "bf16") == 31104


# --- per sequence, below and above the window -------------------------------------------

@pytest.mark.parametrize("name, context, expected", [
    # Mistral: every layer keeps min(context, 4096) tokens of 131072 bytes
    ("mistral", 1000, 131072 * 1000),
    ("mistral", 4096, 131072 * 4096),  # 512 MiB
    ("mistral", 4097, 131072 * 4096),
    ("mistral", 32768, 131072 * 4096),
    # Gemma 2 below the window: all 42 layers keep every token
    ("gemma2", 2048, 344064 * 2048),
    ("gemma2", 4096, 344064 * 4096),
    # above: 8192 x (21 global x 8192 + 21 local x 4096) = 8192 x 258048
    ("gemma2", 8192, 2113929216),
    # Gemma 3 at the window: 62 x 8192 x 1024; one past: 8192 x (10 x 1025 + 52 x 1024)
    ("gemma3", 1024, 520093696),
    ("gemma3", 1025, 8192 * 63498),
    ("gemma3", 32768, 8192 * (10 * 32768 + 52 * 1024)),  # 3120562176, 2.91 GiB
    # DeepSeek: no window, 31104 bytes for every token
    ("deepseek", 32768, 31104 * 32768),  # 1019215872
])
def test_bytes_per_sequence(name, context, expected):
    assert kv_bytes_per_sequence(SPECS[name].architecture, "bf16", context) == expected


def test_the_naive_formula_overstates_the_sla_of_each_example():
    # per sequence at the SLA's context: the memory model, the naive formula
    figures = {name: (kv_bytes_per_sequence(s.architecture, "bf16", s.sla.context_tokens),
                      naive_kv_bytes_per_sequence(s.architecture, "bf16", s.sla.context_tokens))
               for name, s in SPECS.items()}
    assert figures == {
        "mistral": (512 * 2**20, 4 * GiB),  # 4096 vs 32768 tokens of 128 KiB
        "gemma2": (2113929216, 2818572288),  # 258048 vs 344064 layer-tokens of 8 KiB
        "gemma3": (3120562176, 16642998272),  # 380928 vs 62 x 32768 layer-tokens of 8 KiB
        "deepseek": (1019215872, 10871635968),  # 31104 vs 331776 bytes x 32768
    }


# --- which layers are local ------------------------------------------------------------

@pytest.mark.parametrize("layers, local, global_, expected", [
    (8, 1, 0, 8),  # no global layers: all local, whatever localLayers says
    (8, 3, 0, 8),
    (8, 1, 1, 4),  # alternating, a multiple of the pattern
    (7, 1, 1, 4),  # L G L G L G L: the partial group is one local layer
    (7, 2, 1, 5),  # LLG LLG L
    (8, 2, 1, 6),  # LLG LLG LL
    (11, 2, 2, 6),  # LLGG LLGG LLG: the partial group's local layers, then a global one
    (6, 5, 1, 5),  # one group exactly
    (8, 2, 6, 2),  # more global than local
])
def test_local_layers_of_a_pattern(layers, local, global_, expected):
    a = arch(layers=layers, slidingWindow={"tokens": 16, "localLayers": local,
                                           "globalLayers": global_})
    assert local_layers(a) == expected
    # 2 x 2 heads x 64 x 2 bytes = 512 per layer and token; 100 tokens, window 16
    assert kv_bytes_per_sequence(a, "bf16", 100) == 512 * (
        (layers - expected) * 100 + expected * 16)


def test_a_model_without_window_or_latent_keeps_its_meaning():
    # existing Models: default gqa, no window, the plain formula at every context
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = Model.model_validate(yaml.safe_load(path.read_text())).spec
        a = spec.architecture
        assert (a.attention, a.mla, a.sliding_window) == ("gqa", None, None)
        for context in (1, 4097, spec.sla.context_tokens):
            assert (kv_bytes_per_sequence(a, "bf16", context)
                    == naive_kv_bytes_per_sequence(a, "bf16", context)
                    == kv_bytes_per_token(a, "bf16") * context)
        b = replica_budget(spec, 1)
        assert b.kv_bytes_per_token == kv_bytes_per_token(a, spec.kv_cache_dtype)


# --- tensor parallel ---------------------------------------------------------------------

def test_local_and_global_layers_split_by_head_alike():
    a = GEMMA2.architecture  # 8 KV heads
    # TP 2: 2 x 4 heads x 256 x 2 = 4096 per layer and token; the sequence halves
    assert kv_bytes_per_layer_token(a, "bf16", 2) == 4096
    assert kv_bytes_per_sequence(a, "bf16", 8192, 2) == 2113929216 // 2
    # TP 16 > 8 heads: each GPU keeps one whole head, as at TP 8: 2 x 1 x 256 x 2
    assert kv_bytes_per_layer_token(a, "bf16", 8) == kv_bytes_per_layer_token(a, "bf16", 16) == 1024
    assert kv_bytes_per_sequence(a, "bf16", 8192, 16) == 1024 * 258048


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_mla_latent_is_replicated_on_every_gpu(tp):
    a = DEEPSEEK.architecture
    assert kv_bytes_per_layer_token(a, "bf16", tp) == 1152
    b = replica_budget(DEEPSEEK, tp)
    # 16 sequences x 1019215872 on EACH GPU; only the weights shard
    assert b.kv_cache == 16 * 1019215872 == 16307453952
    assert b.weights == 31412968448 // tp  # 15706484224 parameters x 2 bytes


# --- the replica budget and what places on it ---------------------------------------------

def test_gemma2_budget():
    b = replica_budget(GEMMA2, 1)
    assert b.weights == 18483411968  # 9241705984 x 2
    assert b.kv_bytes_per_sequence == 2113929216
    assert b.kv_cache == 16 * 2113929216 == 33822867456  # 31.5 GiB, naive: 42 GiB
    assert b.kv_bytes_per_token == 2113929216 // 8192 == 258048  # 8192 x 31.5 layers
    assert b.kv_cache // b.kv_bytes_per_token == 16 * 8192
    assert b.per_gpu == 18483411968 + 33822867456 + 2 * GiB == 54453763072


def test_gemma3_fits_one_h100_where_the_naive_formula_needs_four():
    b = replica_budget(GEMMA3, 1)
    # 54018692608 weights + 8 x 3120562176 KV + 2 GiB = 81130673664 <= 85520809984
    assert b.per_gpu == 54018692608 + 24964497408 + 2 * GiB == 81130673664
    assert smallest_tp(GEMMA3, H100) == 1
    dense = GEMMA3.model_copy(update={"architecture": GEMMA3.architecture.model_copy(
        update={"sliding_window": None})})
    # every layer global: 8 x 16642998272 of KV; at TP 2 it is still 95728823040 per GPU,
    # at TP 4 13504673152 + 33285996544 + 2 GiB = 48938153344
    assert replica_budget(dense, 2).per_gpu == 95728823040
    assert smallest_tp(dense, H100) == 4


def test_sla_tokens_are_counted_when_the_context_does_not_divide_the_bytes():
    spec = MISTRAL.model_copy(update={"sla": MISTRAL.sla.model_copy(
        update={"context_tokens": 5000})})
    b = replica_budget(spec, 1)
    # a 5000-token sequence keeps 4096 tokens: 536870912 bytes, 107374.18 per token
    assert (b.kv_bytes_per_sequence, b.kv_bytes_per_token) == (536870912, 107374)
    assert b.kv_cache // b.kv_bytes_per_token == 4 * 5000


def test_decode_step_reads_what_each_layer_keeps():
    # Gemma 2 at the SLA: 18483411968 weights + 16 x 2113929216
    assert decode_step_bytes(GEMMA2, 1) == 18483411968 + 33822867456
    # short contexts read every layer's every token: 344064 x 100
    assert decode_step_bytes(GEMMA2, 1, 1, 100) == 18483411968 + 34406400
    # Mistral past its window reads the window only, at any context
    weights = 7241732096 * 2
    assert decode_step_bytes(MISTRAL, 1, 4, 32768) == decode_step_bytes(MISTRAL, 1, 4, 4096) == (
        weights + 4 * 536870912)
    # DeepSeek at TP 4: a quarter of the weights, the whole latent
    assert decode_step_bytes(DEEPSEEK, 4, 2, 1000) == 31412968448 // 4 + 2 * 31104 * 1000


def test_mla_with_a_window_keeps_the_window_of_latents():
    a = arch(layers=4, attentionHeads=8, kvHeads=8, headDim=96, attention="mla",
             mla={"kvLoraRank": 64, "qkRopeHeadDim": 32},
             slidingWindow={"tokens": 10, "localLayers": 1, "globalLayers": 1})
    # (64 + 32) x 2 = 192 per layer and token; 2 global x 50 + 2 local x 10 tokens
    assert kv_bytes_per_sequence(a, "bf16", 50, tp=8) == 192 * 120


# --- the inverse: the longest context within a byte count -----------------------------------

def test_max_context_within_inverts_bytes_per_sequence():
    a = GEMMA3.architecture
    for context in (1, 1000, 1023, 1024, 1025, 4096, 32768, 131072):
        exact = kv_bytes_per_sequence(a, "bf16", context)
        assert max_context_within(a, "bf16", exact) == context
        assert max_context_within(a, "bf16", exact - 1) == context - 1
    # 1024 tokens cost 520093696; each token past the window, 10 global x 8192 = 81920
    assert max_context_within(a, "bf16", 520093696 + 81920 * 7 + 81919) == 1031
    assert max_context_within(a, "bf16", 10**15) == 131072  # capped at maxContextTokens
    assert max_context_within(a, "bf16", 507903) == 0  # not one token (62 x 8192)


def test_max_context_within_when_every_layer_is_local():
    a = MISTRAL.architecture
    window_bytes = 131072 * 4096
    # a full window fits any context the model takes; one byte less, 4095 tokens
    assert max_context_within(a, "bf16", window_bytes) == 32768
    assert max_context_within(a, "bf16", window_bytes - 1) == 4095
    assert max_context_within(a, "bf16", 131072 * 2048) == 2048


def test_max_context_within_matches_the_plain_formula_for_gqa():
    a = ModelSpec.model_validate(llama_spec()).architecture  # 131072 bytes per token
    for budget in (0, 131071, 131072, 10**9, 8192 * 131072):
        assert max_context_within(a, "bf16", budget) == min(budget // 131072, 8192)


# --- kvpilot plan --------------------------------------------------------------------------

def plan(capsys, *args):
    """``kvpilot plan --all-models``: these Models are planned, though kvpilot's worker
    does not serve every attention kind yet."""
    code = main(["plan", "--all-models", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    return out


def test_plan_shows_each_model_against_the_naive_formula(capsys):
    out = plan(capsys, EXAMPLES / "fleets" / "mixed.yaml", *sorted(ATTENTION.glob("*.yaml")))
    lines = out.splitlines()
    start = lines.index("KV CACHE OF ONE REPLICA AT TP 1: BY ITS ATTENTION vs 2 x LAYERS x "
                        "KV HEADS x HEAD DIM x TOKENS")
    assert lines[start + 1:start + 5] == [
        # 16 x 1019215872 = 15.2 GiB; 16 x 10871635968 = 162.0 GiB
        "deepseek-v2-lite  16 x 32,768 tokens: 15.2 GiB vs 162.0 GiB (latent 512 + RoPE key 64)",
        "gemma-2-9b        16 x 8,192 tokens: 31.5 GiB vs 42.0 GiB (21 of 42 layers local, "
        "window 4,096)",
        "gemma-3-27b       8 x 32,768 tokens: 23.2 GiB vs 124.0 GiB (52 of 62 layers local, "
        "window 1,024)",
        "mistral-7b-v0-1   4 x 32,768 tokens: 2.0 GiB vs 16.0 GiB (every layer local, "
        "window 4,096)",
    ]
    assert max(len(line) for line in lines) <= 100
    # Gemma 3 takes one H100: 81130673664 bytes = 75.6 GiB
    assert "  GPU 0  75.6/79.6  29.7 ms:  gemma-3-27b-0 75.6" in lines
    assert lines[-1] == "GPUs with load: 4 of 26 (1 shared); replicas placed: 5 of 5"
    # models with plain GQA get no such line, and no section when all are plain
    out = plan(capsys, EXAMPLES / "fleets" / "mixed.yaml", EXAMPLES / "llama-3-8b.yaml",
               ATTENTION / "gemma-2-9b.yaml")
    assert "\nllama-3-8b  " not in out.split("KV CACHE OF ONE REPLICA")[1]
    assert "KV CACHE OF ONE REPLICA" not in plan(capsys, EXAMPLES / "fleets" / "mixed.yaml",
                                                 EXAMPLES / "llama-3-8b.yaml")


def test_plan_json_carries_both_figures(capsys):
    out = plan(capsys, EXAMPLES / "fleets" / "mixed.yaml", ATTENTION / "gemma-3-27b.yaml",
               "-o", "json")
    (model,) = json.loads(out)["models"]
    assert (model["kvBytesPerSequence"], model["naiveKvBytesPerSequence"]) == (
        3120562176, 16642998272)


def test_a_shorter_context_is_suggested_only_where_it_saves_bytes(capsys, tmp_path):
    # An L4 with exactly 256 MiB left for Mistral v0.1's KV: 14483464192 bytes of weights,
    # an overhead of 24152899584 - 14483464192 - 268435456. The window needs 512 MiB, so
    # the context must shrink below it: 268435456 / 131072 = 2048 tokens. (Averaging the
    # window over 32768 tokens would have said 16384, which saves nothing.)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("nodes:\n  - {name: l4, product: NVIDIA-L4, gpus: 1}\n")
    doc = yaml.safe_load((ATTENTION / "mistral-7b-v0.1.yaml").read_text())
    doc["spec"]["sla"]["concurrentSequences"] = 1
    doc["spec"]["runtimeOverhead"] = L4 - 14483464192 - 268435456
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(doc))
    out = plan(capsys, fleet, model)
    assert "contextTokens <= 2048" in out, out
