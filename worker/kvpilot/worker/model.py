"""A Llama-architecture decoder in PyTorch, and its Hugging Face checkpoint loader.

RMSNorm, rotary position embedding (default, linear and Llama-3 frequency scaling),
grouped-query attention and a SwiGLU MLP, with the checkpoint's q/k/v and gate/up
projections fused into one matrix each (one GEMM instead of three and two). Attention is
not here: ``forward`` hands each layer's rotated ``q, k, v`` to a callback that writes
K/V into the paged cache and attends (``kvpilot.worker.runner``), so one model serves
prefill and paged decode alike.

On a GPU the elementwise work runs as fused Triton kernels
(``kvpilot.worker.kernels.fused``); on CPU as their PyTorch references.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpilot.worker.kernels import fused

SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face ``config.json`` (transformers 4 or 5 keys)."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"only Llama-architecture checkpoints are supported, got "
                             f"model_type {model_type!r}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("Llama checkpoints with attention or MLP biases are not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"rope_type {rope_type!r} is not supported ({SUPPORTED_ROPE})")
        rope["rope_type"] = rope_type
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (float32 ``[head_dim / 2]``) after the checkpoint's scaling,
    computed in float32 as transformers does, so positions rotate identically."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, those between blended.
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = torch.where(medium, blended, scaled)
    return inv.float()


def rope_tables(cfg: LlamaConfig, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 ``[max_positions, head_dim / 2]``."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_frequencies(cfg))
    return angles.cos().to(device), angles.sin().to(device)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            out.append(self.lm_head)
        for lw in self.layers:
            out += [lw.input_norm, lw.qkv, lw.o, lw.post_norm, lw.gate_up, lw.down]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def read_per_step_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the embedding table, of which it
        reads one row per token (the LM head, even when tied to it, is read whole)."""
        embed = self.embed.numel() * self.embed.element_size()
        tied = self.lm_head.data_ptr() == self.embed.data_ptr()
        return self.nbytes() - (0 if tied else embed)


def hf_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {k: p + v for k, v in {
        "input_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight", "post_norm": "post_attention_layernorm.weight",
        "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight"}.items()}


def weights_from_hf(cfg: LlamaConfig, get: Callable[[str], torch.Tensor], device,
                    dtype: torch.dtype) -> LlamaWeights:
    """Build the fused weights from a name -> tensor lookup of Hugging Face names."""
    def t(name: str) -> torch.Tensor:
        return get(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        n = hf_names(i)
        layers.append(LayerWeights(
            input_norm=t(n["input_norm"]),
            qkv=torch.cat([t(n["q"]), t(n["k"]), t(n["v"])]),
            o=t(n["o"]),
            post_norm=t(n["post_norm"]),
            gate_up=torch.cat([t(n["gate"]), t(n["up"])]),
            down=t(n["down"]),
        ))
    embed = t("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else t("lm_head.weight")
    return LlamaWeights(embed, layers, t("model.norm.weight"), lm_head)


def load_config(model_dir: str | Path) -> LlamaConfig:
    model_dir = Path(model_dir)
    cfg = LlamaConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg = replace(cfg, eos_token_ids=_eos_ids(eos))
    return cfg


def _eos_ids(value) -> tuple[int, ...]:
    """``eos_token_id`` of a Hugging Face config: one id, a list of them, or none."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def load_weights(model_dir: str | Path, cfg: LlamaConfig, device, dtype: torch.dtype) -> LlamaWeights:
    """Weights from the ``*.safetensors`` files of a Hugging Face checkpoint directory."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    where: dict[str, object] = {}
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    for h in handles:
        for name in h.keys():
            where[name] = h

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(f"checkpoint {model_dir} has no tensor {name!r}")
        return where[name].get_tensor(name)

    return weights_from_hf(cfg, get, device, dtype)


def random_weights(cfg: LlamaConfig, device, dtype: torch.dtype, *, seed: int = 0,
                   std: float = 0.02) -> LlamaWeights:
    """Random weights in the checkpoint's shapes, made on ``device`` (norms are 1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    h, i = cfg.hidden_size, cfg.intermediate_size
    layers = [LayerWeights(
        input_norm=torch.ones(h, device=device, dtype=dtype),
        qkv=rnd(cfg.q_size + 2 * cfg.kv_size, h), o=rnd(h, cfg.q_size),
        post_norm=torch.ones(h, device=device, dtype=dtype),
        gate_up=rnd(2 * i, h), down=rnd(h, i),
    ) for _ in range(cfg.num_layers)]
    embed = rnd(cfg.vocab_size, h)
    lm_head = embed if cfg.tie_word_embeddings else rnd(cfg.vocab_size, h)
    return LlamaWeights(embed, layers, torch.ones(h, device=device, dtype=dtype), lm_head)


def hf_state_dict(cfg: LlamaConfig, w: LlamaWeights) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face names (unfused views), e.g. to load them into
    transformers' ``LlamaForCausalLM`` or to write a checkpoint."""
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w.lm_head
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i, lw in enumerate(w.layers):
        n = hf_names(i)
        sd[n["input_norm"]] = lw.input_norm
        sd[n["q"]], sd[n["k"]], sd[n["v"]] = lw.qkv[:q], lw.qkv[q:q + kv], lw.qkv[q + kv:]
        sd[n["o"]] = lw.o
        sd[n["post_norm"]] = lw.post_norm
        sd[n["gate"]], sd[n["up"]] = lw.gate_up[:inter], lw.gate_up[inter:]
        sd[n["down"]] = lw.down
    return sd


# An attention callback: (layer index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D].
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Llama:
    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, max_positions: int):
        self.cfg = cfg
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.cos, self.sin = rope_tables(cfg, max_positions, self.device)
        self.fused = self.device.type == "cuda"

    def _norm(self, x, residual, weight):
        fn = fused.add_rms_norm if self.fused else fused.add_rms_norm_ref
        return fn(x, residual, weight, self.cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final hidden states (after the last norm), ``[tokens, hidden]``."""
        cfg = self.cfg
        rope = fused.rope_ if self.fused else fused.rope_ref_
        silu_mul = fused.silu_mul if self.fused else fused.silu_mul_ref
        x = F.embedding(input_ids, self.w.embed)
        residual = None
        t = x.shape[0]
        for i, lw in enumerate(self.w.layers):
            h, residual = self._norm(x, residual, lw.input_norm)
            qkv = F.linear(h, lw.qkv)
            q = qkv[:, :cfg.q_size].view(t, cfg.num_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(t, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
            rope(q, k, positions, self.cos, self.sin)
            o = attend(i, q, k, v)
            x = F.linear(o.reshape(t, cfg.q_size), lw.o)
            h, residual = self._norm(x, residual, lw.post_norm)
            x = F.linear(silu_mul(F.linear(h, lw.gate_up)), lw.down)
        h, _ = self._norm(x, residual, self.w.norm)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.w.lm_head).float()
