"""Shared by the family tests: a tiny random checkpoint per ``model_type``, written by
transformers itself, prompts, and the check that the engine's greedy tokens are
transformers' own."""

from __future__ import annotations

import json

import torch
import transformers

from kvpilot.worker.scheduler import SamplingParams
from kvpilot.worker.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = (1, 17, 40)  # around page boundaries (16)
TOL = 1e-4  # float32: rounding only
BF16_TOL = 0.25  # logit gap allowed between a bf16 engine and float32 transformers

# Shared by every family's config: vocabulary and special tokens of the tiny tokenizer.
_TOK = build_tokenizer()
VOCAB = _TOK.get_vocab_size(with_added_tokens=True)
BOS, EOS = _TOK.token_to_id(SPECIAL_TOKENS[0]), _TOK.token_to_id(SPECIAL_TOKENS[1])
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=256, rms_norm_eps=1e-5,
              bos_token_id=BOS, eos_token_id=EOS)

# model_type -> (transformers config class, its tiny sizes). Qwen2 has Qwen2.5-0.5B's
# attention (14 heads, 2 KV heads of 64, hidden 896, tied embeddings, rope base 1e6);
# Qwen3 a head_dim that is not hidden / heads, as Qwen3's own; Phi-3 heads of 96.
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=128, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32,
                                      sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=896, num_attention_heads=14,
                                  num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=1000000.0, max_position_embeddings=32768,
                                  use_sliding_window=False, sliding_window=32768,
                                  max_window_layers=21)),
    "qwen3": ("Qwen3Config", dict(hidden_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=64,
                                  rope_theta=1000000.0)),
    "phi3": ("Phi3Config", dict(hidden_size=384, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=None)),
    # Gemma 2: local and global layers alternating, a window of 16 (prompts and outputs
    # run past it), soft-capped scores and logits, query_pre_attn_scalar not head_dim.
    "gemma2": ("Gemma2Config", dict(hidden_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, sliding_window=16,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    # Gemma 3: two local layers then a global one, q/k norms, local RoPE base 1e4 and
    # global 1e6 with linear scaling, as Gemma 3's own.
    "gemma3_text": ("Gemma3TextConfig", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=3, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0}})),
}
# Checkpoints whose every layer slides (Mistral-7B v0.1, Phi-3-mini-4k, Qwen2 with
# use_sliding_window), with windows short enough for the prompts to run past them; Phi-3's
# 24 is not a whole number of pages (16).
WINDOWED = {
    "mistral": dict(sliding_window=16),
    "phi3": dict(sliding_window=24),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
}


def write_family_checkpoint(out, model_type: str, seed: int = 0, **overrides):
    """A random checkpoint of ``model_type`` written by transformers itself. Every tensor
    is drawn afresh (transformers initializes biases to 0 and norms to 1, which would
    hide a missing bias or norm): norms near 1, the rest small normal values. A tied
    embedding is drawn small, or each token's own row would dominate its logits and
    greedy decoding would repeat the last token whatever the layers compute."""
    cls_name, sizes = FAMILY_CONFIGS[model_type]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **sizes, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_((0.02 if cfg.tie_word_embeddings else 1.0) * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                std = 0.2 if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")) else 0.05
                param.copy_(std * torch.randn_like(param))
    model.save_pretrained(out)
    _TOK.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
         "chat_template": CHAT_TEMPLATE}))
    return out


def prompts(lengths=PROMPT_LENGTHS):
    return [[(7 * i + 3 * n) % 256 for i in range(n)] for n in lengths]


def assert_transformers_agrees(ckpt, seqs, tol=TOL, first=NEW_TOKENS):
    """Each of the ``first`` generated tokens is transformers' argmax after the same
    prefix (or within ``tol`` of it: a near tie), from one teacher-forced forward pass
    per sequence."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for s in seqs:
        assert s.num_output == NEW_TOKENS
        tokens = list(s.prompt) + list(s.output)
        with torch.inference_mode():
            logits = hf(torch.tensor([tokens])).logits[0].float()
        for i, tok in enumerate(s.output[:first]):
            row = logits[len(s.prompt) - 1 + i]
            best = int(row.argmax())
            gap = float(row[best] - row[tok])
            assert tok == best or gap <= tol, (
                f"token {i}: engine {tok}, transformers {best} (logit gap {gap:.4g})")
