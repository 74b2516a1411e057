"""A tiny random Llama checkpoint in Hugging Face format, for tests, e2e runs and demos.

``python -m kvpilot.worker.tiny DIR [--seed N]`` writes ``config.json`` (with Llama-3
rope scaling), ``model.safetensors`` (float32), ``generation_config.json``,
``tokenizer.json`` (byte-level BPE: every UTF-8 text encodes, one token per byte, plus
Llama-3's special tokens) and ``tokenizer_config.json`` (a Llama-3 chat template). The
same seed and sizes give the same bytes. It imports numpy, not torch, so it is quick.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = tok.token_to_id(SPECIAL_TOKENS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[0]} $A", pair=f"{SPECIAL_TOKENS[0]} $A $B",
        special_tokens=[(SPECIAL_TOKENS[0], bos)])
    return tok


def write_tiny_checkpoint(out: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                          heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                          max_positions: int = 4096, tie_word_embeddings: bool = False) -> Path:
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
        "torch_dtype": "float32",
    }
    rng = np.random.default_rng(seed)

    def rnd(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return (1.0 + rnd(hidden, std=0.1)).astype(np.float32)

    q, kv = heads * head_dim, kv_heads * head_dim
    tensors = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": rnd(q, hidden, std=0.2),
            p + "self_attn.k_proj.weight": rnd(kv, hidden, std=0.2),
            p + "self_attn.v_proj.weight": rnd(kv, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, q),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": rnd(intermediate, hidden),
            p + "mlp.up_proj.weight": rnd(intermediate, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, intermediate),
        })
    tensors["model.norm.weight"] = norm()
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = rnd(vocab, hidden, std=0.5)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"],
         "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "chat_template": CHAT_TEMPLATE, "model_max_length": max_positions}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvpilot.worker.tiny",
                                 description="Write a tiny random Llama checkpoint.")
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--max-positions", type=int, default=4096)
    a = ap.parse_args(argv)
    path = write_tiny_checkpoint(a.dir, seed=a.seed, layers=a.layers, hidden=a.hidden,
                                 heads=a.heads, kv_heads=a.kv_heads,
                                 intermediate=a.intermediate, max_positions=a.max_positions)
    print(path)


if __name__ == "__main__":
    main()
