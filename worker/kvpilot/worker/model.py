"""A Llama-architecture decoder in PyTorch, and its Hugging Face checkpoint loader.

RMSNorm, rotary position embedding (default, linear and Llama-3 frequency scaling),
grouped-query attention and a SwiGLU MLP, with the checkpoint's q/k/v and gate/up
projections fused into one matrix each (one GEMM instead of three and two).

Families (``FAMILIES``, by ``config.json``'s ``model_type``)
    One model with a few switches, as vLLM and nano-vllm do, rather than a copy per
    family: ``llama`` and ``mistral`` are the plain layer; ``qwen2`` adds biases to q/k/v
    (``qkv_bias``); ``qwen3`` RMSNorms each head of q and k before RoPE (``qk_norm``);
    ``phi3`` stores q/k/v and gate/up already fused in the checkpoint (``packed``: read
    by parts, so a rank still gets whole heads); ``gemma2`` and ``gemma3_text`` (and the
    text model of a multimodal ``gemma3`` checkpoint) norm by ``1 + weight``, scale the
    embedding, norm the attention's and the MLP's outputs, use GeGLU, scale scores by
    ``query_pre_attn_scalar``, soft-cap scores and logits (Gemma 2), and give local
    layers their own RoPE base (Gemma 3). Sliding windows (Mistral v0.1, Phi-3-mini-4k,
    Gemma's local layers) are read as ``kvpilot.api.checkpoint`` reads them for the
    memory model (``local_layers``, ``sliding_window``); the runner keeps and attends to
    only a local layer's window. Any other ``model_type``, or a feature a family's
    checkpoint has that the layer lacks, is refused at load with the reason.

Attention is not here: ``forward`` hands each layer's rotated ``q, k, v`` to a callback
that writes K/V into the paged cache and attends (``kvpilot.worker.runner``), so one
model serves prefill and paged decode alike.

On a GPU the elementwise work runs as fused Triton kernels
(``kvpilot.worker.kernels.fused``); on CPU as their PyTorch references.

Tensor parallelism (Megatron-style; ``Partition`` says what one rank holds)
    q/k/v and gate/up are split by output rows (column-parallel: whole heads, whole MLP
    channels), o and down by input columns (row-parallel), so a layer needs one
    all-reduce after o and one after down. KV heads are split as
    ``kvpilot.api.memory`` counts them: ``ceil(kvHeads / tp)`` per rank, the same head
    on ``tp / kvHeads`` ranks where ``kvHeads < tp``. The embedding and the LM head are
    vocab-parallel: each rank holds ``ceil(vocab / tp)`` rows (the last padded with
    zeros); a lookup is a masked local lookup plus one all-reduce, the logits one
    all-gather. Replicating them would be simpler, but for Llama-3's 128K vocabulary it
    costs 2 x 2.1 GB on every GPU of a 70B replica, bytes the memory model (weights /
    tp per GPU) does not reserve. Norms are replicated. ``comm`` does the collectives
    (``kvpilot.worker.parallel.Comm``); without it the model is whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpilot.api.checkpoint import architecture_from_config, local_layer_flags, text_config
from kvpilot.worker.kernels import fused

SUPPORTED_ROPE = ("default", "linear", "llama3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Family:
    """How a checkpoint family's layer differs from Llama's (all off: Llama)."""

    qkv_bias: bool = False  # q/k/v projections have biases (o has none)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE
    packed: bool = False  # the checkpoint holds qkv_proj and gate_up_proj, fused
    # Gemma 2/3: RMSNorms scale by 1 + weight, the embedding is scaled by sqrt(hidden),
    # the attention's and the MLP's outputs are normed before their residual adds
    # ("sandwich" norms), the MLP is GeGLU (tanh GELU) and the word embeddings are tied.
    gemma: bool = False


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(packed=True),
    "gemma2": Family(gemma=True),
    "gemma3_text": Family(qk_norm=True, gemma=True),
}
# What transformers' config classes default to where a config.json leaves a field out.
_FAMILY_DEFAULTS = {
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
               "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
}


def _rope(params: dict, theta: float | None, what: str) -> tuple[float, dict]:
    """RoPE base and scaling of a layer kind from its ``rope_parameters`` (or the
    config's ``rope_scaling``); ValueError for a kind the worker does not rotate by."""
    params = dict(params or {})
    partial = float(params.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        raise ValueError(f"{what}: partial_rotary_factor {partial} is not supported "
                         "(RoPE over the whole head)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"{what}: rope_type {kind!r} is not supported ({SUPPORTED_ROPE})")
    params["rope_type"] = kind
    return float(theta or params.get("rope_theta") or 10000.0), params


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
    model_type: str = "llama"
    family: Family = Family()
    # Sliding windows: the layers that keep (and attend to) only their last
    # ``sliding_window`` tokens, read as kvpilot.api.checkpoint reads them for the memory
    # model; () when every layer is global.
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] = ()
    # Local layers' RoPE where it differs from the global one (Gemma 3), else None.
    local_rope_theta: float | None = None
    local_rope_scaling: dict = field(default_factory=dict)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # scores become cap * tanh(score / cap)
    final_softcap: float | None = None  # the same for the logits

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face ``config.json`` (transformers 4 or 5 keys; a multimodal
        checkpoint's ``text_config``); ValueError naming the model_type for a family, or
        a feature of one, the model lacks."""
        d = text_config(d)
        model_type = d.get("model_type", "llama")
        family = FAMILIES.get(model_type)
        if family is None:
            raise ValueError(f"model_type {model_type!r} is not a family the worker serves "
                             f"({', '.join(FAMILIES)})")
        d = {**_FAMILY_DEFAULTS.get(model_type, {}), **d}  # an explicit null stays null
        what = f"model_type {model_type}"
        if d.get("mlp_bias"):
            raise ValueError(f"{what}: MLP biases are not supported")
        if d.get("attention_bias") and not family.qkv_bias:
            raise ValueError(f"{what}: attention biases are not supported")
        act = d.get("hidden_activation") if family.gemma else d.get("hidden_act", "silu")
        wanted = "gelu_pytorch_tanh" if family.gemma else "silu"
        if act != wanted:
            raise ValueError(f"{what}: hidden activation {act!r} is not supported ({wanted})")
        arch = architecture_from_config(d)
        window = arch.get("slidingWindow")
        heads = int(d["num_attention_heads"])
        layers = int(d["num_hidden_layers"])
        partial = float(d.get("partial_rotary_factor") or 1.0)
        if partial != 1.0:
            raise ValueError(f"{what}: partial_rotary_factor {partial} is not supported "
                             "(RoPE over the whole head)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        local_theta, local_scaling = None, {}
        if "full_attention" in rope or "sliding_attention" in rope:  # per layer kind (tf 5)
            theta, scaling = _rope(rope.get("full_attention"), None, what)
            if "sliding_attention" in rope:
                local_theta, local_scaling = _rope(rope["sliding_attention"], None, what)
        else:
            theta, scaling = _rope(rope, d.get("rope_theta"), what)
            if d.get("rope_local_base_freq"):  # Gemma 3's local layers (transformers 4)
                local_theta, local_scaling = _rope({}, d["rope_local_base_freq"], what)
        softcap = d.get("attn_logit_softcapping") if family.gemma else None
        final = d.get("final_logit_softcapping") if family.gemma else None
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
            model_type=model_type,
            family=family,
            sliding_window=window["tokens"] if window else None,
            local_layers=tuple(local_layer_flags(window, layers)) if window else (),
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5 if family.gemma else None,
            attn_softcap=float(softcap) if softcap else None,
            final_softcap=float(final) if final else None,
        )

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None for a global layer."""
        return self.sliding_window if self.local_layers and self.local_layers[layer] else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        norms = 4 if self.family.gemma else 2
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + norms * h
        if self.family.qkv_bias:
            layer += self.q_size + 2 * self.kv_size
        if self.family.qk_norm:
            layer += 2 * self.head_dim
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


def rope_tables(cfg: LlamaConfig, max_positions: int, device, *,
                local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 ``[max_positions, head_dim / 2]``; with ``local``, those of the
    local layers (where they have their own base)."""
    if local and cfg.local_rope_theta is not None:
        cfg = replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=cfg.local_rope_scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_frequencies(cfg))
    return angles.cos().to(device), angles.sin().to(device)


@dataclass(frozen=True)
class Partition:
    """What rank ``rank`` of a replica at tensor-parallel degree ``size`` holds: query
    heads ``head_start .. + num_heads``, KV heads ``kv_head_start .. + num_kv_heads``,
    MLP channels ``inter_start .. + intermediate``, vocabulary rows ``vocab_start ..
    + vocab_rows`` (the last rank's run past the vocabulary: zero rows)."""

    rank: int
    size: int
    num_heads: int
    head_start: int
    num_kv_heads: int
    kv_head_start: int
    intermediate: int
    inter_start: int
    vocab_rows: int
    vocab_start: int
    head_dim: int

    @classmethod
    def of(cls, cfg: LlamaConfig, rank: int = 0, size: int = 1) -> Partition:
        heads, kv = cfg.num_heads, cfg.num_kv_heads
        if heads % size or (kv % size and size % kv):
            raise ValueError(f"tensor-parallel degree {size} must divide the {heads} "
                             f"attention heads and divide or be a multiple of the {kv} KV heads")
        if cfg.intermediate_size % size:
            raise ValueError(f"tensor-parallel degree {size} does not divide the MLP's "
                             f"{cfg.intermediate_size} channels")
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} of {size}")
        # ceil(kv / size) heads, as kvpilot.api.memory counts them; where kv < size,
        # rank r holds head r * kv // size: a whole group of its query heads.
        local_kv = -(-kv // size)
        vocab_rows = -(-cfg.vocab_size // size)
        return cls(rank=rank, size=size, num_heads=heads // size,
                   head_start=rank * (heads // size), num_kv_heads=local_kv,
                   kv_head_start=rank * kv // size,
                   intermediate=cfg.intermediate_size // size,
                   inter_start=rank * (cfg.intermediate_size // size),
                   vocab_rows=vocab_rows, vocab_start=rank * vocab_rows, head_dim=cfg.head_dim)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden] (this rank's heads)
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden] (this rank's channels)
    down: torch.Tensor  # [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None  # [q_size + 2 * kv_size] (Family.qkv_bias)
    q_norm: torch.Tensor | None = None  # [head_dim] (Family.qk_norm)
    k_norm: torch.Tensor | None = None  # [head_dim]
    attn_out_norm: torch.Tensor | None = None  # [hidden] (Family.gemma)
    mlp_out_norm: torch.Tensor | None = None  # [hidden] (Family.gemma)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.input_norm, self.qkv, self.o, self.post_norm, self.gate_up, self.down]
        extra = (self.qkv_bias, self.q_norm, self.k_norm, self.attn_out_norm, self.mlp_out_norm)
        return out + [t for t in extra if t is not None]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden], or this rank's vocab_rows
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            out.append(self.lm_head)
        for lw in self.layers:
            out += lw.tensors()
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
    """Layer ``i``'s tensors under Hugging Face names, those of every family (a
    checkpoint holds the ones its family uses: ``qkv`` and ``gate_up`` when packed;
    Gemma's ``post_norm`` is the attention output's norm and ``pre_ff_norm`` the MLP
    input's, which is ``LayerWeights.post_norm``)."""
    p = f"model.layers.{i}."
    return {k: p + v for k, v in {
        "input_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
        "qkv": "self_attn.qkv_proj.weight",
        "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
        "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
        "o": "self_attn.o_proj.weight", "post_norm": "post_attention_layernorm.weight",
        "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
        "gate_up": "mlp.gate_up_proj.weight",
        "pre_ff_norm": "pre_feedforward_layernorm.weight",
        "post_ff_norm": "post_feedforward_layernorm.weight",
        "down": "mlp.down_proj.weight"}.items()}


# A checkpoint lookup: (name, None) -> the whole tensor; (name, (dim, start, stop)) ->
# rows (dim 0) or columns (dim 1) start..stop of it.
Get = Callable[[str, "tuple[int, int, int] | None"], torch.Tensor]


def weights_from_hf(cfg: LlamaConfig, get: Get, device, dtype: torch.dtype,
                    part: Partition | None = None) -> LlamaWeights:
    """Build the fused weights of ``part`` (default: the whole model) from a lookup of
    Hugging Face names that reads only the slices asked for."""
    p = part or Partition.of(cfg)
    d = cfg.head_dim
    fam = cfg.family

    def t(name: str, dim: int | None = None, *runs: tuple[int, int]) -> torch.Tensor:
        """The whole tensor, or the runs ``(start, count)`` of it along ``dim``, joined
        (a rank's part of a packed tensor is one run per part; at TP 1 the runs cover
        the whole tensor in order)."""
        if p.size == 1 or dim is None:
            return get(name, None).to(device=device, dtype=dtype)
        pieces = [get(name, (dim, start, start + count)) for start, count in runs]
        return torch.cat(pieces, dim=dim).to(device=device, dtype=dtype)

    def norm(name: str) -> torch.Tensor:
        """An RMSNorm weight as it multiplies: Gemma stores it as an offset from 1."""
        if not fam.gemma:
            return t(name)
        return (1.0 + get(name, None).float()).to(device=device, dtype=dtype)

    def vocab(name: str) -> torch.Tensor:
        rows = t(name, 0, (p.vocab_start, min(p.vocab_rows, cfg.vocab_size - p.vocab_start)))
        if rows.shape[0] < p.vocab_rows:  # the last rank's rows past the vocabulary
            pad = rows.new_zeros(p.vocab_rows - rows.shape[0], rows.shape[1])
            rows = torch.cat([rows, pad])
        return rows

    q_rows = (p.head_start * d, p.q_size)
    kv_rows = (p.kv_head_start * d, p.kv_size)
    inter = (p.inter_start, p.intermediate)

    def after(run: tuple[int, int], offset: int) -> tuple[int, int]:
        return (run[0] + offset, run[1])

    # Where this rank's q, k and v rows lie in a packed [q; k; v] tensor.
    packed_qkv = (q_rows, after(kv_rows, cfg.q_size), after(kv_rows, cfg.q_size + cfg.kv_size))
    layers = []
    for i in range(cfg.num_layers):
        n = hf_names(i)
        if fam.packed:
            qkv = t(n["qkv"], 0, *packed_qkv)
            gate_up = t(n["gate_up"], 0, inter, after(inter, cfg.intermediate_size))
        else:
            qkv = torch.cat([t(n["q"], 0, q_rows), t(n["k"], 0, kv_rows), t(n["v"], 0, kv_rows)])
            gate_up = torch.cat([t(n["gate"], 0, inter), t(n["up"], 0, inter)])
        bias = None
        if fam.qkv_bias:
            bias = torch.cat([t(n["q_bias"], 0, q_rows), t(n["k_bias"], 0, kv_rows),
                              t(n["v_bias"], 0, kv_rows)])
        layers.append(LayerWeights(
            input_norm=norm(n["input_norm"]), qkv=qkv, o=t(n["o"], 1, q_rows),
            post_norm=norm(n["pre_ff_norm"] if fam.gemma else n["post_norm"]),
            gate_up=gate_up, down=t(n["down"], 1, inter),
            qkv_bias=bias,
            q_norm=norm(n["q_norm"]) if fam.qk_norm else None,
            k_norm=norm(n["k_norm"]) if fam.qk_norm else None,
            attn_out_norm=norm(n["post_norm"]) if fam.gemma else None,
            mlp_out_norm=norm(n["post_ff_norm"]) if fam.gemma else None,
        ))
    embed = vocab("model.embed_tokens.weight") if p.size > 1 else t("model.embed_tokens.weight")
    if cfg.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = vocab("lm_head.weight") if p.size > 1 else t("lm_head.weight")
    return LlamaWeights(embed, layers, norm("model.norm.weight"), lm_head)


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


_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def load_weights(model_dir: str | Path, cfg: LlamaConfig, device, dtype: torch.dtype,
                 part: Partition | None = None) -> LlamaWeights:
    """Weights from the ``*.safetensors`` files of a Hugging Face checkpoint directory;
    with ``part``, only that rank's slices are read (``safe_open(...).get_slice``)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    where: dict[str, object] = {}
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    for h in handles:
        for name in h.keys():
            where[name] = h

    # A multimodal checkpoint (Gemma 3) keeps its language model under a prefix.
    prefix = next((p for p in _TEXT_PREFIXES if p + "embed_tokens.weight" in where), "model.")

    def get(name: str, piece: tuple[int, int, int] | None) -> torch.Tensor:
        if name.startswith("model."):
            name = prefix + name[len("model."):]
        if name not in where:
            raise KeyError(f"checkpoint {model_dir} has no tensor {name!r}")
        if piece is None:
            return where[name].get_tensor(name)
        dim, start, stop = piece
        sliced = where[name].get_slice(name)
        return sliced[start:stop] if dim == 0 else sliced[:, start:stop]

    return weights_from_hf(cfg, get, device, dtype, part)


def random_weights(cfg: LlamaConfig, device, dtype: torch.dtype, *, seed: int = 0,
                   std: float = 0.02, part: Partition | None = None) -> LlamaWeights:
    """Random weights in the checkpoint's shapes (or ``part``'s), made on ``device``
    (norms are 1). Shards of different ranks are not slices of one model: for timing."""
    p = part or Partition.of(cfg)
    g = torch.Generator(device=device).manual_seed(seed + 1000 * p.rank)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    h, i, fam = cfg.hidden_size, p.intermediate, cfg.family

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    layers = [LayerWeights(
        input_norm=ones(h), qkv=rnd(p.q_size + 2 * p.kv_size, h), o=rnd(h, p.q_size),
        post_norm=ones(h), gate_up=rnd(2 * i, h), down=rnd(h, i),
        qkv_bias=rnd(p.q_size + 2 * p.kv_size) if fam.qkv_bias else None,
        q_norm=ones(p.head_dim) if fam.qk_norm else None,
        k_norm=ones(p.head_dim) if fam.qk_norm else None,
        attn_out_norm=ones(h) if fam.gemma else None,
        mlp_out_norm=ones(h) if fam.gemma else None,
    ) for _ in range(cfg.num_layers)]
    vocab = cfg.vocab_size if p.size == 1 else p.vocab_rows
    embed = rnd(vocab, h)
    lm_head = embed if cfg.tie_word_embeddings else rnd(vocab, h)
    return LlamaWeights(embed, layers, torch.ones(h, device=device, dtype=dtype), lm_head)


def hf_state_dict(cfg: LlamaConfig, w: LlamaWeights) -> dict[str, torch.Tensor]:
    """The weights of a whole model under its family's Hugging Face names (views; q/k/v
    and gate/up unfused unless the family packs them), e.g. to load them into
    transformers' ``*ForCausalLM`` or to write a checkpoint."""
    fam = cfg.family

    def norm(x: torch.Tensor) -> torch.Tensor:  # Gemma stores a norm's offset from 1
        return (x.float() - 1.0).to(x.dtype) if fam.gemma else x

    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": norm(w.norm)}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w.lm_head
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i, lw in enumerate(w.layers):
        n = hf_names(i)
        sd[n["input_norm"]] = norm(lw.input_norm)
        if fam.packed:
            sd[n["qkv"]], sd[n["gate_up"]] = lw.qkv, lw.gate_up
        else:
            sd[n["q"]], sd[n["k"]], sd[n["v"]] = lw.qkv[:q], lw.qkv[q:q + kv], lw.qkv[q + kv:]
            sd[n["gate"]], sd[n["up"]] = lw.gate_up[:inter], lw.gate_up[inter:]
        if lw.qkv_bias is not None:
            b = lw.qkv_bias
            sd[n["q_bias"]], sd[n["k_bias"]], sd[n["v_bias"]] = b[:q], b[q:q + kv], b[q + kv:]
        if lw.q_norm is not None:
            sd[n["q_norm"]], sd[n["k_norm"]] = norm(lw.q_norm), norm(lw.k_norm)
        sd[n["o"]] = lw.o
        if fam.gemma:
            sd[n["post_norm"]] = norm(lw.attn_out_norm)
            sd[n["pre_ff_norm"]] = norm(lw.post_norm)
            sd[n["post_ff_norm"]] = norm(lw.mlp_out_norm)
        else:
            sd[n["post_norm"]] = lw.post_norm
        sd[n["down"]] = lw.down
    return sd


# An attention callback: (layer index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
# (this rank's heads).
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Collectives(Protocol):
    """The collectives of a tensor-parallel model (``kvpilot.worker.parallel.Comm``)."""

    def all_reduce_(self, x: torch.Tensor) -> None: ...

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor: ...


class Llama:
    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, max_positions: int, *,
                 part: Partition | None = None, comm: Collectives | None = None):
        self.cfg = cfg
        self.part = part or Partition.of(cfg)
        if self.part.size > 1 and comm is None:
            raise ValueError("a tensor-parallel shard needs its collectives")
        self.comm = comm if self.part.size > 1 else None
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.cos, self.sin = rope_tables(cfg, max_positions, self.device)
        # Per layer: its (cos, sin); local layers share a second table where their base
        # differs (Gemma 3).
        local = (rope_tables(cfg, max_positions, self.device, local=True)
                 if cfg.local_rope_theta is not None else (self.cos, self.sin))
        self.layer_rope = [local if cfg.window_of(i) is not None else (self.cos, self.sin)
                           for i in range(cfg.num_layers)]
        self.fused = self.device.type == "cuda"

    def _norm(self, x, residual, weight):
        fn = fused.add_rms_norm if self.fused else fused.add_rms_norm_ref
        return fn(x, residual, weight, self.cfg.rms_norm_eps)

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each head of ``x`` (``[tokens, heads, head_dim]``), a new
        contiguous tensor."""
        fn = fused.add_rms_norm if self.fused else fused.add_rms_norm_ref
        t, heads, d = x.shape
        return fn(x.reshape(t * heads, d), None, weight, self.cfg.rms_norm_eps)[0].view(t, heads, d)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self._lookup(input_ids)
        if self.cfg.family.gemma:  # scaled in the model's dtype, as Gemma does
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return F.embedding(input_ids, self.w.embed)
        # Vocab-parallel: rows held elsewhere look up row 0 and are zeroed; the sum over
        # ranks has exactly one non-zero term per token, so it is exact in any dtype.
        local = input_ids - self.part.vocab_start
        outside = (local < 0) | (local >= self.part.vocab_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.w.embed)
        x = x.masked_fill(outside[:, None], 0)
        self.comm.all_reduce_(x)
        return x

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-parallel product's partial results."""
        if self.comm is not None:
            self.comm.all_reduce_(x)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final hidden states (after the last norm), ``[tokens, hidden]``, the same on
        every rank."""
        p = self.part
        d = p.head_dim
        rope = fused.rope_ if self.fused else fused.rope_ref_
        if self.cfg.family.gemma:
            act_mul = _gelu_tanh_mul
        else:
            act_mul = fused.silu_mul if self.fused else fused.silu_mul_ref
        x = self._embed(input_ids)
        residual = None
        t = x.shape[0]
        for i, lw in enumerate(self.w.layers):
            h, residual = self._norm(x, residual, lw.input_norm)
            qkv = F.linear(h, lw.qkv, lw.qkv_bias)
            q = qkv[:, :p.q_size].view(t, p.num_heads, d)
            k = qkv[:, p.q_size:p.q_size + p.kv_size].view(t, p.num_kv_heads, d)
            v = qkv[:, p.q_size + p.kv_size:].view(t, p.num_kv_heads, d)
            if lw.q_norm is not None:
                q, k = self._head_norm(q, lw.q_norm), self._head_norm(k, lw.k_norm)
            rope(q, k, positions, *self.layer_rope[i])
            o = attend(i, q, k, v)
            x = self._reduce(F.linear(o.reshape(t, p.q_size), lw.o))
            if lw.attn_out_norm is not None:
                x = self._norm(x, None, lw.attn_out_norm)[0]
            h, residual = self._norm(x, residual, lw.post_norm)
            x = self._reduce(F.linear(act_mul(F.linear(h, lw.gate_up)), lw.down))
            if lw.mlp_out_norm is not None:
                x = self._norm(x, None, lw.mlp_out_norm)[0]
        h, _ = self._norm(x, residual, self.w.norm)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 ``[tokens, vocab]``; under tensor parallelism every rank gets them
        whole (one all-gather of the ranks' vocabulary columns, in the model's dtype)."""
        out = F.linear(hidden, self.w.lm_head)
        if self.comm is not None:
            out = self.comm.all_gather_columns(out)[:, :self.cfg.vocab_size]
        out = out.float()
        cap = self.cfg.final_softcap
        return out if cap is None else torch.tanh(out / cap) * cap


def _gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU: ``gelu_tanh(gate) * up`` of ``[tokens, 2 * inter]`` (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
