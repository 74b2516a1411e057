"""A Model's facts from a Hugging Face checkpoint, and the check of a checkpoint against
a Model.

``kvpilot import`` describes a checkpoint with these functions, and a worker checks the
checkpoint it was given against its Model's spec with them before it serves. Both go
through :func:`architecture_from_config`, so an imported Model always passes the check.

- :func:`architecture_from_config`: ``spec.architecture`` (camelCase, as in a Model file)
  from ``config.json``, by ``model_type``.
- :func:`weights_from_safetensors`: the weights' bytes and dtype from the safetensors
  headers alone (8-byte little-endian length, then JSON naming each tensor's dtype and
  byte range), never the tensors, so a 140 GB checkpoint is described in milliseconds.
- :func:`checkpoint_mismatches`: every field where a Model's spec and a checkpoint
  disagree, one line each, naming both values.

Pure: json, struct and os; no torch, kopf, kubernetes or huggingface_hub.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from kvpilot.api import memory
from kvpilot.api.model import DNS_LABEL, MAX_MODEL_NAME, ModelSpec

# The Model dtype of each safetensors dtype. Packed 4-bit weights have no dtype of their
# own: GPTQ, AWQ and compressed-tensors pack eight in an I32, bitsandbytes and MXFP4 two
# in a U8. Other dtypes (F64, I64, BOOL...) name no Model dtype.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8", "F8_E5M2": "fp8",
    "I8": "int8", "I32": "int4", "U8": "int4",
}
# torch_dtype (dtype in configs transformers 5 writes) -> Model dtype.
CONFIG_DTYPES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# An fp32 checkpoint served in bf16 takes bf16 bytes in HBM (the worker casts as it
# loads), so between these the check compares the checkpoint's bytes converted to the
# Model's dtype. A cast to fp8 or int8 is quantization, which the check does not assume.
_CASTABLE = ("fp32", "bf16", "fp16")
# safetensors refuses headers over 100 MB; one that claims more is not a checkpoint.
MAX_HEADER_BYTES = 100_000_000
WEIGHTS_TOLERANCE = 50  # the Model's weights may differ from the checkpoint's by 1/50 (2%)
DEFAULT_CONTEXT = 8192
DEFAULT_CONCURRENCY = 8

# What transformers' config classes default to, for the fields published config.json
# files leave out (Gemma 3's multimodal checkpoints give their text_config a handful of
# fields and rely on these); engines load the config through those classes.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "gemma2": {"head_dim": 256, "sliding_window": 4096},
    "gemma3_text": {"head_dim": 256, "max_position_embeddings": 131072,
                    "sliding_window": 4096, "sliding_window_pattern": 6},
    "qwen2": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
}
_MLA = ("deepseek_v2", "deepseek_v3")
_DECODER_HEADS = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


class CheckpointUnreadable(ValueError):
    """A checkpoint file that is missing or cannot be read (not a disagreement)."""


# --- config.json -> architecture ---------------------------------------------------------

def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config: ``text_config`` of a multimodal checkpoint (Gemma 3,
    Llava...), else the config itself; ``model_type`` always set (Gemma 3's text config
    is ``gemma3_text``)."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        return dict(config)
    out = dict(text)
    if not out.get("model_type"):
        parent = config.get("model_type")
        out["model_type"] = "gemma3_text" if parent == "gemma3" else parent
    return out


def config_dtype(config: Mapping[str, Any]) -> Optional[str]:
    """The Model dtype config.json states (``torch_dtype``, or ``dtype`` in configs that
    transformers 5 writes), or None. A hint only: gemma-2-9b-it says float32 and ships
    bf16 tensors."""
    for where in (text_config(config), config):
        for key in ("torch_dtype", "dtype"):
            if isinstance(where.get(key), str) and where[key] in CONFIG_DTYPES:
                return CONFIG_DTYPES[where[key]]
    return None


def architecture_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.architecture`` (camelCase keys) from a Hugging Face ``config.json``.

    ValueError naming the field and the model_type when a field is missing or the
    checkpoint is not a decoder LLM, or when its pattern of sliding-window layers is one
    the Model API cannot express.
    """
    cfg = text_config(config)
    kind = cfg.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("config.json has no model_type")
    cfg = {**_DEFAULTS.get(kind, {}), **cfg}  # an explicit null stays null
    _check_decoder(config, kind)
    layers = _int(cfg, "num_hidden_layers", kind)
    heads = _int(cfg, "num_attention_heads", kind)
    max_context = _int(cfg, "max_position_embeddings", kind)
    if cfg.get("kv_lora_rank") is not None or kind in _MLA:
        nope = _int(cfg, "qk_nope_head_dim", kind)
        rope = _int(cfg, "qk_rope_head_dim", kind)
        # The latent expands to a key and a value for every query head.
        return {"layers": layers, "attentionHeads": heads, "kvHeads": heads,
                "headDim": nope + rope, "maxContextTokens": max_context,
                "attention": "mla",
                "mla": {"kvLoraRank": _int(cfg, "kv_lora_rank", kind), "qkRopeHeadDim": rope}}
    kv_heads = heads
    if cfg.get("num_key_value_heads") is not None:  # absent or null: MHA
        kv_heads = _int(cfg, "num_key_value_heads", kind)
    if cfg.get("head_dim") is not None:
        head_dim = _int(cfg, "head_dim", kind)
    else:
        hidden = _int(cfg, "hidden_size", kind)
        if hidden % heads:
            raise ValueError(f"config.json (model_type {kind}): hidden_size {hidden} is not a "
                             f"multiple of num_attention_heads {heads}, and head_dim is missing")
        head_dim = hidden // heads
    arch: dict[str, Any] = {"layers": layers, "attentionHeads": heads, "kvHeads": kv_heads,
                            "headDim": head_dim, "maxContextTokens": max_context}
    window = _sliding_window(cfg, kind, layers, max_context)
    if window is not None:
        arch["slidingWindow"] = window
    return arch


def _check_decoder(config: Mapping[str, Any], kind: str) -> None:
    if config.get("is_encoder_decoder"):
        raise ValueError(f"config.json (model_type {kind}) is an encoder-decoder model; "
                         "kvpilot serves decoder LLMs")
    names = config.get("architectures")
    if isinstance(names, list) and names and not any(
            isinstance(n, str) and n.endswith(_DECODER_HEADS) for n in names):
        raise ValueError(f"config.json (model_type {kind}): architectures "
                         f"{', '.join(map(str, names))} is not a decoder LLM "
                         f"(a *ForCausalLM)")


def _int(cfg: Mapping[str, Any], field: str, kind: str) -> int:
    value = cfg.get(field)
    if value is None:
        raise ValueError(f"config.json (model_type {kind}) has no {field}")
    if type(value) is not int or value < 0:
        raise ValueError(f"config.json (model_type {kind}): {field} must be a whole "
                         f"number, not {value!r}")
    return value


def _sliding_window(cfg: Mapping[str, Any], kind: str, layers: int,
                    max_context: int) -> Optional[dict[str, int]]:
    """``slidingWindow`` from which layers the model's attention slides (as transformers
    and vLLM read the config), or None when none does."""
    window = cfg.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        return None  # Qwen 2.5 and 3 name a window they do not use
    if window is None:
        return None
    window = _int(cfg, "sliding_window", kind)
    types = cfg.get("layer_types")
    if isinstance(types, list):
        # Configs transformers 5 writes name each layer's attention.
        if len(types) != layers:
            raise ValueError(f"config.json (model_type {kind}): layer_types names "
                             f"{len(types)} layers, num_hidden_layers is {layers}")
        local = [t == "sliding_attention" for t in types]
    elif kind in ("mistral", "mixtral", "phi3"):
        # Every layer slides. Phi-3-mini-4k's 2047 (of 4096 positions) is real too:
        # transformers masks every Phi-3 layer to it (create_sliding_window_causal_mask),
        # and vLLM's attention layers, given no per-layer window, take the config's
        # sliding_window, so its KV manager keeps 2047 tokens per layer and frees older
        # blocks. Counting the whole context would reserve twice what a 4K sequence
        # holds. (Phi-3-mini-128k and Phi-3.5 say 262144, beyond their context: none.)
        local = [True] * layers
    elif kind == "gemma2":
        local = [i % 2 == 0 for i in range(layers)]  # layer 0 local, then alternating
    elif kind == "gemma3_text":
        pattern = _int(cfg, "sliding_window_pattern", kind)  # every pattern-th is global
        local = [pattern > 0 and (i + 1) % pattern != 0 for i in range(layers)]
    elif kind in ("qwen2", "qwen3"):
        # The first max_window_layers layers attend over everything, the rest slide.
        first = _int(cfg, "max_window_layers", kind)
        local = [i >= first for i in range(layers)]
    else:
        raise ValueError(f"config.json (model_type {kind}) has sliding_window {window} "
                         "but no layer_types: which of its layers slide is not known; "
                         "write architecture.slidingWindow by hand")
    if window >= max_context or not any(local):
        return None  # a window as long as the context never slides
    return _window_pattern(local, window, kind)


def _window_pattern(local: list[bool], window: int, kind: str) -> dict[str, int]:
    """The Model API's pattern (``localLayers`` local layers, then ``globalLayers``
    global ones, repeating from layer 0) that marks exactly these layers local."""
    if all(local):
        return {"tokens": window}
    lead = next(i for i, x in enumerate(local) if not x)
    follow = next((i for i, x in enumerate(local[lead:]) if x), len(local) - lead)
    if lead and [i % (lead + follow) < lead for i in range(len(local))] == local:
        return {"tokens": window, "localLayers": lead, "globalLayers": follow}
    raise ValueError(
        f"config.json (model_type {kind}): its sliding-window layers "
        f"({_layer_ranges(local)} of {len(local)}) are not a pattern of local layers, then "
        "global ones, repeating from layer 0, which is all architecture.slidingWindow "
        "can say")


def _layer_ranges(local: list[bool]) -> str:
    runs: list[list[int]] = []
    for i, x in enumerate(local):
        if not x:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "layers " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- safetensors headers -> weights -------------------------------------------------------

def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``config.json`` (or the one in a directory) as a dict; CheckpointUnreadable
    when it is missing or not a JSON object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_HEADER_BYTES))
    except OSError as err:
        raise CheckpointUnreadable(f"{path}: cannot read: {err.strerror or err}") from err
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointUnreadable(f"{path}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointUnreadable(f"{path}: not a JSON object")
    return data


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (so a
    truncated download is found here, not when loading); the tensors are not read."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointUnreadable(f"{path}: not a safetensors file (under 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CheckpointUnreadable(f"{path}: not a safetensors file (a header of "
                                           f"{length} bytes)")
            raw = f.read(length)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise CheckpointUnreadable(f"{path}: cannot read: {err.strerror or err}") from err
    if len(raw) < length:
        raise CheckpointUnreadable(f"{path}: truncated (its header needs {length} bytes)")
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise CheckpointUnreadable(f"{path}: not a safetensors file (header: {err})") from err
    if not isinstance(header, dict):
        raise CheckpointUnreadable(f"{path}: not a safetensors file (header not an object)")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = _offsets(info, f"{path}: tensor {name}")
        if end > data:
            raise CheckpointUnreadable(f"{path}: truncated (tensor {name} ends at byte "
                                       f"{end} of {data})")
    return header


def _offsets(info: Any, where: str) -> tuple[int, int]:
    offsets = info.get("data_offsets") if isinstance(info, Mapping) else None
    if (not isinstance(offsets, (list, tuple)) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]
            or not isinstance(info.get("dtype"), str)):
        raise CheckpointUnreadable(f"{where}: no valid dtype and data_offsets")
    return offsets[0], offsets[1]


def tensor_bytes(headers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Bytes per safetensors dtype ("BF16": ...) over the tensors of these headers
    (parsed headers, or the hub's metadata in the same shape)."""
    out: dict[str, int] = {}
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = _offsets(info, f"tensor {name}")
            out[info["dtype"]] = out.get(info["dtype"], 0) + end - start
    return out


def weights_from_headers(headers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"bytes": N, "dtype": D, "safetensorsDtype": S}``: all tensor bytes, the
    safetensors dtype S that holds most of them and its Model dtype D (None when no
    Model dtype names S, e.g. I64)."""
    by_dtype = tensor_bytes(headers)
    if not by_dtype:
        raise CheckpointUnreadable("the safetensors hold no tensors")
    largest = max(sorted(by_dtype), key=lambda d: by_dtype[d])
    return {"bytes": sum(by_dtype.values()), "dtype": SAFETENSORS_DTYPES.get(largest),
            "safetensorsDtype": largest}


def weights_from_safetensors(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """:func:`weights_from_headers` of these safetensors files."""
    return weights_from_headers([read_safetensors_header(p) for p in paths])


def safetensors_files(directory: str | os.PathLike[str]) -> list[str]:
    """The checkpoint's safetensors files: those its ``model.safetensors.index.json``
    maps tensors to, else every ``*.safetensors`` (Mistral's repositories also hold a
    ``consolidated.safetensors`` of the same tensors, which the index leaves out)."""
    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointUnreadable(f"{index}: no weight_map")
        names = sorted(set(map(str, weight_map.values())))
    else:
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        except OSError as err:
            raise CheckpointUnreadable(f"{directory}: cannot read: {err.strerror or err}") from err
    if not names:
        raise CheckpointUnreadable(f"{directory}: no *.safetensors files")
    return [os.path.join(directory, n) for n in names]


def weights_from_directory(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`weights_from_safetensors` of a checkpoint directory."""
    return weights_from_safetensors(safetensors_files(directory))


# --- a Model from a checkpoint --------------------------------------------------------------

def model_name(text: str) -> str:
    """A valid Model name from a repository or directory name: lowercase, every run of
    other characters ('.', '_', ' ') one '-', at most 50 characters;
    ``Llama-3.1-8B-Instruct`` -> ``llama-3-1-8b-instruct``. ValueError when nothing is left."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:MAX_MODEL_NAME].rstrip("-")
    if not re.fullmatch(DNS_LABEL, name):
        raise ValueError(f"cannot make a Model name of {text!r}: give --name")
    return name


def model_document(*, name: str, architecture: Mapping[str, Any],
                   weights: Mapping[str, Any], source: Optional[str] = None,
                   context: Optional[int] = None, concurrency: int = DEFAULT_CONCURRENCY,
                   kv_cache_dtype: str = "bf16") -> dict[str, Any]:
    """A Model (as the dict a YAML file holds) for a checkpoint: its architecture and
    weights, and an SLA of ``context`` tokens (default: the model's longest context, at
    most 8192) x ``concurrency`` sequences. Not validated here."""
    if context is None:
        context = min(architecture["maxContextTokens"], DEFAULT_CONTEXT)
    spec: dict[str, Any] = {}
    if source is not None:
        spec["source"] = source
    spec["weights"] = dict(weights)
    spec["architecture"] = dict(architecture)
    spec["kvCacheDtype"] = kv_cache_dtype
    spec["sla"] = {"contextTokens": context, "concurrentSequences": concurrency}
    return {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name}, "spec": spec}


# --- a Model's spec against a checkpoint -------------------------------------------------------

def checkpoint_mismatches(spec: ModelSpec, config: Mapping[str, Any], weight_bytes: int,
                          weight_dtype: Optional[str] = None) -> list[str]:
    """Every field where the Model's spec disagrees with the checkpoint (its config.json
    and the bytes of its safetensors), as ``field: the Model says X, config.json says Y``;
    empty when they agree.

    ``maxContextTokens`` may be less than the checkpoint's (a Model may serve less);
    ``weights`` must be within 2% of the safetensors' bytes, converted to the Model's
    dtype when the checkpoint's (``weight_dtype``) is another of fp32, bf16 and fp16.
    ValueError when config.json cannot be read as an architecture.
    """
    found = architecture_from_config(config)
    model = spec.architecture.model_dump(by_alias=True, exclude_none=True)
    out = []

    def differ(field: str, said: Any, held: Any) -> None:
        out.append(f"architecture.{field}: the Model says {said}, config.json says {held}")

    for field in ("layers", "attentionHeads", "kvHeads", "headDim"):
        if model[field] != found[field]:
            differ(field, model[field], found[field])
    if model["maxContextTokens"] > found["maxContextTokens"]:
        differ("maxContextTokens", model["maxContextTokens"],
               f"{found['maxContextTokens']} (max_position_embeddings; a Model may say "
               "less, not more)")
    if model["attention"] != found.get("attention", "gqa"):
        differ("attention", model["attention"], found.get("attention", "gqa"))
    elif "mla" in found:
        for field in ("kvLoraRank", "qkRopeHeadDim"):
            if model["mla"][field] != found["mla"][field]:
                differ(f"mla.{field}", model["mla"][field], found["mla"][field])
    out.extend(_window_mismatches(model.get("slidingWindow"), found.get("slidingWindow"),
                                  found["layers"]))
    weights = _weights_mismatch(spec, weight_bytes, weight_dtype)
    if weights:
        out.append(weights)
    return out


def local_layer_flags(window: Mapping[str, int], layers: int) -> list[bool]:
    """Which layers of a model with ``architecture.slidingWindow`` ``window`` (camelCase
    keys) slide: ``localLayers`` local then ``globalLayers`` global, from layer 0 on."""
    local, glob = window.get("localLayers", 1), window.get("globalLayers", 0)
    return [glob == 0 or i % (local + glob) < local for i in range(layers)]


def _describe(window: Optional[Mapping[str, int]]) -> str:
    if window is None:
        return "none (every layer global)"
    if window.get("globalLayers", 0) == 0:
        return f"tokens {window['tokens']} on every layer"
    return (f"tokens {window['tokens']}, localLayers {window.get('localLayers', 1)}, "
            f"globalLayers {window['globalLayers']}")


def _window_mismatches(said: Optional[Mapping[str, int]], held: Optional[Mapping[str, int]],
                       layers: int) -> list[str]:
    if said is None or held is None:
        if said is held:
            return []
        return [f"architecture.slidingWindow: the Model says {_describe(said)}, config.json "
                f"says {_describe(held)}"]
    out = []
    if said["tokens"] != held["tokens"]:
        out.append(f"architecture.slidingWindow.tokens: the Model says {said['tokens']}, "
                   f"config.json says {held['tokens']}")
    if local_layer_flags(said, layers) != local_layer_flags(held, layers):
        for field, default in (("localLayers", 1), ("globalLayers", 0)):
            a, b = said.get(field, default), held.get(field, default)
            if a != b:
                out.append(f"architecture.slidingWindow.{field}: the Model says {a}, "
                           f"config.json says {b}")
    return out


def _gib(n: float) -> str:
    """A size as people read it: GiB, or MiB below one GiB (a tiny test checkpoint)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _weights_mismatch(spec: ModelSpec, held: int, held_dtype: Optional[str]) -> Optional[str]:
    said = memory.weight_bytes(spec)
    dtype = spec.weights.dtype
    compared, as_served = held, ""
    if held_dtype in _CASTABLE and dtype in _CASTABLE and held_dtype != dtype:
        compared = round(held * memory.DTYPE_BYTES[dtype] / memory.DTYPE_BYTES[held_dtype])
        as_served = f"; {_gib(compared)} = {compared} bytes in {dtype}"
    if abs(said - compared) * WEIGHTS_TOLERANCE <= compared:
        return None
    w = spec.weights
    how = (f"{w.bytes} = {said} bytes" if w.bytes is not None and w.bytes != said
           else f"{said} bytes" if w.bytes is not None
           else f"{said} bytes: {w.parameters} parameters x {dtype}")
    of = f" of {held_dtype}" if held_dtype else ""
    return (f"weights: the Model says {_gib(said)} ({how}), the safetensors hold "
            f"{_gib(held)} ({held} bytes{of}{as_served})")
