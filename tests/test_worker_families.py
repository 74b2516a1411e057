"""The worker's model families (``kvpilot.worker.model.FAMILIES``) against transformers:
a tiny random checkpoint per family, made with transformers' own config and model
classes and written with ``save_pretrained``, served by the engine greedy, token for
token (CPU, float32), at TP 1 and over gloo at TP 2; and what is refused at load."""

from __future__ import annotations

import json
import math

import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from kvpilot.api.checkpoint import architecture_from_config  # noqa: E402
from kvpilot.api.model import Model  # noqa: E402
from kvpilot.api.support import worker_support_problem  # noqa: E402
from kvpilot.worker.model import (  # noqa: E402
    FAMILIES,
    LlamaConfig,
    Partition,
    load_config,
    load_weights,
)
from kvpilot.worker.scheduler import Sequence  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402
from tests.family_helpers import (  # noqa: E402
    BF16_TOL,
    FAMILY_CONFIGS,
    GREEDY,
    NEW_TOKENS,
    WINDOWED,
    assert_transformers_agrees,
    prompts,
    write_family_checkpoint,
)
from tests.worker_helpers import tiny_engine  # noqa: E402

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {t: write_family_checkpoint(tmp_path_factory.mktemp(t), t, seed=i)
            for i, t in enumerate(FAMILY_CONFIGS)}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return {t: write_family_checkpoint(tmp_path_factory.mktemp(f"{t}-window"), t, seed=10 + i,
                                       **extra)
            for i, (t, extra) in enumerate(WINDOWED.items())}


# ---- the families against transformers ---------------------------------------------------
def test_every_family_is_tested():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_greedy_tokens_equal_transformers(model_type, checkpoints):
    ckpt = checkpoints[model_type]
    cfg = load_config(ckpt)
    assert (cfg.model_type, cfg.family) == (model_type, FAMILIES[model_type])
    engine = tiny_engine(ckpt)
    seqs = engine.generate(prompts(), GREEDY)
    assert_transformers_agrees(ckpt, seqs)
    base = prompts((40,))[0]
    hits = engine.generate([base + [5, 6, 7]], GREEDY)
    if cfg.sliding_window is None:
        # A second pass over cached prefixes: prefill reads K/V back from the pages.
        assert engine.scheduler.bm.hit_tokens >= 32
    else:  # no prefix cache where local layers keep only their window
        assert engine.scheduler.bm.hit_tokens == 0
    assert_transformers_agrees(ckpt, hits)


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_prefill_logits_equal_transformers(model_type, checkpoints):
    """The logits themselves, not only their argmax: Gemma 2's soft-capped logits keep
    the argmax, so greedy tokens alone would not see a missing cap."""
    ckpt = checkpoints[model_type]
    engine = tiny_engine(ckpt)
    prompt = prompts((40,))[0]
    engine.scheduler.add(Sequence(prompt, GREEDY))
    got = engine.runner.prefill(engine.scheduler.schedule().seqs)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_every_layer_in_a_window_equals_transformers(model_type, windowed):
    ckpt = windowed[model_type]
    cfg = load_config(ckpt)
    assert all(cfg.local_layers) and cfg.sliding_window == WINDOWED[model_type]["sliding_window"]
    engine = tiny_engine(ckpt)
    pool = engine.scheduler.bm.pools[0]
    assert len(engine.scheduler.bm.pools) == 1 and pool.ring_pages == -(-cfg.sliding_window // 16)
    assert_transformers_agrees(ckpt, engine.generate(prompts(), GREEDY))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_tp2_equals_tp1(model_type, checkpoints):
    ckpt = checkpoints[model_type]
    expected = [s.output for s in tiny_engine(ckpt).generate(prompts(), GREEDY)]
    engine = tiny_engine(ckpt, tp=2)
    try:
        cfg = load_config(ckpt)
        assert engine.runner.model.part.num_kv_heads == math.ceil(cfg.num_kv_heads / 2)
        assert [s.output for s in engine.generate(prompts(), GREEDY)] == expected
    finally:
        engine.runner.close()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "phi3"])
def test_a_rank_holds_its_rows_of_biases_and_packed_tensors(model_type, checkpoints):
    ckpt = checkpoints[model_type]
    cfg = load_config(ckpt)
    whole = load_weights(ckpt, cfg, "cpu", torch.float32)
    shards = [load_weights(ckpt, cfg, "cpu", torch.float32, Partition.of(cfg, r, 2))
              for r in (0, 1)]
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    pq, pkv, pi = q // 2, kv // 2, inter // 2
    for i in range(cfg.num_layers):
        w, a, b = whole.layers[i], shards[0].layers[i], shards[1].layers[i]
        for name in ("qkv", "qkv_bias"):
            full, left, right = getattr(w, name), getattr(a, name), getattr(b, name)
            if full is None:
                assert left is None and right is None
                continue
            for lo, hi, plo, phi in ((0, q, 0, pq), (q, q + kv, pq, pq + pkv),
                                     (q + kv, q + 2 * kv, pq + pkv, pq + 2 * pkv)):
                torch.testing.assert_close(torch.cat([left[plo:phi], right[plo:phi]]),
                                           full[lo:hi], rtol=0, atol=0)
        for lo, plo in ((0, 0), (inter, pi)):  # gate, then up
            torch.testing.assert_close(
                torch.cat([a.gate_up[plo:plo + pi], b.gate_up[plo:plo + pi]]),
                w.gate_up[lo:lo + inter], rtol=0, atol=0)
        if w.q_norm is not None:  # per head: every rank holds it whole
            for shard in (a, b):
                torch.testing.assert_close(shard.q_norm, w.q_norm, rtol=0, atol=0)
                torch.testing.assert_close(shard.k_norm, w.k_norm, rtol=0, atol=0)


def test_parameters_are_counted_as_transformers_counts_them(checkpoints):
    for model_type, ckpt in checkpoints.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        assert load_config(ckpt).num_parameters() == hf.num_parameters(), model_type


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_gpu_greedy_tokens_agree_with_transformers(model_type, kv_dtype, checkpoints):
    """bf16 weights, the Triton kernels (Phi-3's heads of 96 in a padded tile), CUDA
    graphs; a token may differ from float32 transformers' argmax only by a near tie."""
    ckpt = checkpoints[model_type]
    engine = tiny_engine(ckpt, device="cuda", dtype="bf16", kv_dtype=kv_dtype)
    assert engine.runner.cuda_graphs
    seqs = engine.generate(prompts(), GREEDY)
    # FP8 K/V drift from there on; the prompt's own K/V are used unquantized in prefill,
    # so the first token is as close as bf16's.
    assert_transformers_agrees(ckpt, seqs, tol=BF16_TOL,
                               first=NEW_TOKENS if kv_dtype == "bf16" else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_gpu_every_layer_in_a_window_agrees_with_transformers(model_type, windowed):
    """The decode kernel's window over a ring of pages, compiled, in CUDA graphs."""
    ckpt = windowed[model_type]
    engine = tiny_engine(ckpt, device="cuda", dtype="bf16", kv_dtype="bf16")
    assert engine.runner.cuda_graphs
    assert_transformers_agrees(ckpt, engine.generate(prompts(), GREEDY), tol=BF16_TOL)


# ---- Qwen2.5-0.5B: the example Model and its checkpoint's shape ----------------------------
def test_the_qwen2_5_example_is_served_and_its_checkpoint_shape_loads(checkpoints):
    doc = yaml.safe_load((EXAMPLES / "qwen2.5-0.5b.yaml").read_text())
    spec = Model.model_validate(doc).spec
    assert worker_support_problem(spec, tp=1) is None
    ckpt = checkpoints["qwen2"]
    arch = architecture_from_config(json.loads((ckpt / "config.json").read_text()))
    example = doc["spec"]["architecture"]
    assert {k: arch[k] for k in ("attentionHeads", "kvHeads", "headDim", "maxContextTokens")} == {
        k: example[k] for k in ("attentionHeads", "kvHeads", "headDim", "maxContextTokens")}
    assert "slidingWindow" not in arch  # use_sliding_window: false


# ---- refused at load -------------------------------------------------------------------------
def test_an_unknown_model_type_fails_at_load_naming_it(tmp_path, checkpoints):
    d = json.loads((checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not a family the worker serves"):
        LlamaConfig.from_hf({**d, "model_type": "gpt_neox"})


@pytest.mark.parametrize("model_type, extra, why", [
    # Qwen2 with its first layer global and the rest sliding: not a pattern from layer 0.
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1,
               "layer_types": None}, "its sliding-window layers"),
    ("qwen3", {"attention_bias": True}, "model_type qwen3: attention biases"),
    ("llama", {"mlp_bias": True}, "model_type llama: MLP biases"),
    ("llama", {"hidden_act": "gelu"}, "hidden activation 'gelu'"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden activation 'gelu'"),
    ("phi3", {"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}},
     "rope_type 'yarn'"),
])
def test_what_a_family_lacks_fails_at_load(model_type, extra, why, checkpoints):
    d = json.loads((checkpoints[model_type] / "config.json").read_text())
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        LlamaConfig.from_hf({**d, **extra})


def test_a_mistral_window_as_long_as_the_context_never_slides(checkpoints):
    d = json.loads((checkpoints["mistral"] / "config.json").read_text())
    cfg = LlamaConfig.from_hf({**d, "sliding_window": d["max_position_embeddings"]})
    assert cfg.model_type == "mistral"
