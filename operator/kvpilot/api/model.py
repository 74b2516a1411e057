"""The Model custom resource (group kvpilot.dev, version v1alpha1) as pydantic models.

These classes are the single source of the API: the CRD in ``crds/`` is generated from
them (``python -m kvpilot.api.crd``), and the operator, planner and worker load specs
through them. Cross-field rules are written once, as :class:`Rule` objects that carry a
CEL expression for the API server, a Python check for files loaded locally, and the one
human message both give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema,
    field_validator, model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kvpilot.api.source import (
    IMAGE_REFERENCE, MESSAGES as SOURCE_MESSAGES, PATTERNS as SOURCE_PATTERNS, SCHEMES,
    UNKNOWN_SCHEME, scheme_of,
)
from kvpilot.api.quantity import (
    BYTES_HINT, MAX_BYTES, QUANTITY_PATTERN, RESOURCE_QUANTITY_PATTERN, parse_bytes,
    parse_quantity,
)

GROUP = "kvpilot.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Model"
PLURAL = "models"

WeightDtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]
KVCacheDtype = Literal["bf16", "fp16", "fp8"]

# Names derived from a Model's name must stay valid: replica pod names append a suffix
# of up to 13 characters ("-" + replica index or a generated hash) and label values and
# pod hostnames hold at most 63, so a Model name is a DNS label of at most 50.
MAX_MODEL_NAME = 50
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# GPUs per replica: a power of two, as GPUs come in nodes of 1, 2, 4, 8 or 16.
TENSOR_PARALLEL_DEGREES = (1, 2, 4, 8, 16)
MAX_TENSOR_PARALLEL = TENSOR_PARALLEL_DEGREES[-1]
MAX_INT64 = 2**63 - 1


@dataclass(frozen=True)
class Rule:
    """A rule enforced by the API server (CEL) and by pydantic (``check``).

    ``check`` receives what the rule is attached to (CEL's ``self``: a pydantic object,
    or a field's value) and returns True when the rule holds. ``message`` is what a user
    sees in both places; ``field`` (a CEL ``fieldPath`` such as ``.sla.contextTokens``)
    is where both report it, when it concerns one field of an object.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: Optional[str] = None

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = self.field
        return out


def rule_error(broken: list[Rule]) -> PydanticCustomError:
    """One error for the broken rules, located (by ``field``) at the first one's field."""
    return PydanticCustomError(
        "rule", "; ".join(r.message for r in broken), {"field": broken[0].field or ""}
    )


def checked(*rules: Rule) -> tuple[Any, ...]:
    """``Annotated`` metadata that enforces field-level rules on both sides."""

    def check(value: Any) -> Any:
        broken = [r for r in rules if not r.check(value)]
        if broken:
            raise rule_error(broken)
        return value

    schema = {"x-kubernetes-validations": [r.schema() for r in rules]}
    return Field(json_schema_extra=schema), AfterValidator(check)


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


def _int_or_string(validate: Callable[[Any], Any], rule: str, message: str,
                   max_length: int) -> Any:
    """An int-or-string type validated by one function, with one message on both sides.

    ``validate`` gets an int (never a bool) or a string of at most ``max_length`` and
    returns False or raises ValueError when the value is not valid. pydantic would
    report a union member by member (``constrained-int``, ``(and 1 more)``); a plain
    validator says the one thing a user needs.
    """

    def plain(value: Any) -> Any:
        ok = type(value) is int or (isinstance(value, str) and len(value) <= max_length)
        try:
            ok = ok and validate(value) is not False
        except ValueError:
            ok = False
        if not ok:
            raise PydanticCustomError("int_or_string", message)
        return value

    schema = {"x-kubernetes-int-or-string": True, "maxLength": max_length,
              "x-kubernetes-validations": [{"rule": rule, "message": message}]}
    return Annotated[Union[int, str], PlainValidator(plain), WithJsonSchema(schema)]


# A byte count: a plain integer or a Kubernetes quantity string ("16Gi", "500M"), at most
# 1 PiB (no GPU, model or overhead comes near it).
Quantity = _int_or_string(
    parse_bytes,
    f"type(self) == int ? (self >= 0 && self <= {MAX_BYTES}) : "
    f"(self.matches(r'{QUANTITY_PATTERN}') && "
    "quantity(self).compareTo(quantity('1Pi')) <= 0)",
    f"must be a byte count: {BYTES_HINT}",
    64,
)


# A container resource quantity ("500m" CPU, "4Gi" memory), as a pod accepts it, minus
# negative values (a pod refuses those).
ResourceQuantity = _int_or_string(
    parse_quantity,
    f"type(self) == int ? (self >= 0 && self <= {MAX_INT64}) : "
    f"self.matches(r'{RESOURCE_QUANTITY_PATTERN}')",
    "must be a non-negative quantity such as 500m, 2, 4Gi or 1e3",
    64,
)


class KubeModel(BaseModel):
    """Base: camelCase JSON names, unknown fields refused, rules checked after parsing.

    Types are strict, as the API server's schema is: "2" is not an integer, true is not
    a number, 1.0 is not a count.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        strict=True,
    )
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> "KubeModel":
        broken = [rule for rule in self.RULES if not rule.check(self)]
        if broken:
            raise rule_error(broken)
        return self


class Weights(KubeModel):
    """How large the weights are: a parameter count times the dtype width, or bytes."""

    parameters: Optional[int] = Field(
        None, ge=1, le=2**48, description="Parameter count, e.g. 8030261248 for Llama-3-8B."
    )
    bytes: Optional[Quantity] = Field(
        None,
        description="Total size of the weights (e.g. 16Gi); overrides parameters x dtype.",
    )
    dtype: WeightDtype = Field("bf16", description="Data type the weights are served in.")

    RULES = (
        Rule(
            "has(self.parameters) || has(self.bytes)",
            "weights needs parameters (e.g. 8030261248) or bytes (e.g. 16Gi)",
            lambda w: w.parameters is not None or w.bytes is not None,
        ),
    )


AttentionKind = Literal["gqa", "mla"]


class SlidingWindow(KubeModel):
    """Local layers: each attends over its last ``tokens`` tokens only, so it keeps at
    most that many tokens of KV per sequence, whatever the context.

    Which layers are local repeats from layer 0: ``localLayers`` local layers, then
    ``globalLayers`` global ones, again and again; a last, partial group starts with its
    local layers. Mistral-7B v0.1 (every layer local): the defaults. Gemma 2 (local and
    global alternate, layer 0 local): 1 and 1. Gemma 3 (every sixth layer global): 5
    and 1.
    """

    tokens: int = Field(
        ge=1, le=16_777_216,
        description="The window: tokens of KV a local layer keeps per sequence "
        "(sliding_window in the model's config.json).",
    )
    local_layers: int = Field(
        1, ge=1, le=1024, description="Local layers at the start of each repeating group."
    )
    global_layers: int = Field(
        0, ge=0, le=1024,
        description="Global layers (attending over the whole context) that end each "
        "group; 0: every layer is local.",
    )


class LatentAttention(KubeModel):
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): per token, each layer
    caches one compressed latent and one RoPE key shared by all heads, no per-head K/V."""

    kv_lora_rank: int = Field(
        ge=1, le=16_384,
        description="Width of the cached KV latent (kv_lora_rank in config.json).",
    )
    qk_rope_head_dim: int = Field(
        ge=1, le=1024,
        description="Width of the cached RoPE key (qk_rope_head_dim in config.json).",
    )


class Architecture(KubeModel):
    """The transformer shape that sizes the KV cache."""

    layers: int = Field(ge=1, le=1024, description="Number of transformer layers.")
    attention_heads: int = Field(ge=1, le=1024, description="Query heads per layer.")
    kv_heads: int = Field(ge=1, le=1024, description="Key/value heads per layer (GQA groups).")
    head_dim: int = Field(
        ge=8, le=1024,
        description="Dimension of one attention head, a multiple of 8. Workers serve "
        "powers of two from 16 to 256; other values are planned, and the Model is marked "
        "as not servable by the worker.",
    )
    max_context_tokens: int = Field(
        ge=1, le=16_777_216, description="Longest context the model supports, in tokens."
    )
    attention: AttentionKind = Field(
        "gqa",
        description="What a layer caches per token: gqa (K and V of every KV head; MHA "
        "and MQA are gqa too) or mla (one latent shared by all heads; needs mla).",
    )
    mla: Optional[LatentAttention] = Field(
        None, description="The latent's dimensions, for attention: mla only."
    )
    sliding_window: Optional[SlidingWindow] = Field(
        None, description="Which layers attend over a window of recent tokens only; "
        "absent: every layer attends over the whole context.",
    )

    RULES = (
        Rule(
            "self.kvHeads < 1 || self.attentionHeads % self.kvHeads == 0",
            "kvHeads must divide attentionHeads (each KV head serves a whole group of "
            "query heads)",
            lambda a: a.attention_heads % a.kv_heads == 0,
            ".kvHeads",
        ),
        Rule(
            "self.headDim % 8 == 0",
            "headDim must be a multiple of 8 (as every model's is, e.g. 64, 96 or 128)",
            lambda a: a.head_dim % 8 == 0,
            ".headDim",
        ),
        Rule(
            "self.attention != 'mla' || has(self.mla)",
            "attention mla needs mla.kvLoraRank and mla.qkRopeHeadDim (kv_lora_rank and "
            "qk_rope_head_dim in the model's config.json)",
            lambda a: a.attention != "mla" or a.mla is not None,
            ".attention",
        ),
        Rule(
            "self.attention == 'mla' || !has(self.mla)",
            "mla dimensions are for attention: mla; a gqa model caches K and V per KV "
            "head (set attention: mla, or remove mla)",
            lambda a: a.attention == "mla" or a.mla is None,
            ".mla",
        ),
        Rule(
            "self.attention != 'mla' || self.kvHeads == self.attentionHeads",
            "attention mla needs kvHeads equal to attentionHeads (the latent expands to a "
            "key and a value for every query head, as num_key_value_heads says in "
            "DeepSeek's config.json)",
            lambda a: a.attention != "mla" or a.kv_heads == a.attention_heads,
            ".kvHeads",
        ),
        Rule(
            "!has(self.mla) || self.mla.qkRopeHeadDim < self.headDim",
            "mla.qkRopeHeadDim must be less than headDim (a query/key head is "
            "qk_nope_head_dim + qk_rope_head_dim)",
            lambda a: a.mla is None or a.mla.qk_rope_head_dim < a.head_dim,
            ".mla.qkRopeHeadDim",
        ),
        Rule(
            "!has(self.slidingWindow) || self.slidingWindow.tokens <= self.maxContextTokens",
            "slidingWindow.tokens must be <= maxContextTokens (a window longer than the "
            "longest context never slides: leave slidingWindow out)",
            lambda a: a.sliding_window is None
            or a.sliding_window.tokens <= a.max_context_tokens,
            ".slidingWindow.tokens",
        ),
        Rule(
            "!has(self.slidingWindow) || "
            "self.slidingWindow.localLayers + self.slidingWindow.globalLayers <= self.layers",
            "slidingWindow.localLayers + slidingWindow.globalLayers must be <= layers (one "
            "group of the local/global pattern must fit in the model)",
            lambda a: a.sliding_window is None
            or a.sliding_window.local_layers + a.sliding_window.global_layers <= a.layers,
            ".slidingWindow",
        ),
    )


class ContextSLA(KubeModel):
    """What one replica must serve: the KV cache is sized for all of it at once."""

    context_tokens: int = Field(
        ge=1, le=16_777_216, description="Tokens per sequence (prompt + output) to hold."
    )
    concurrent_sequences: int = Field(
        ge=1, le=65_536, description="Sequences one replica serves at once."
    )
    ttft_milliseconds: Optional[int] = Field(
        None, ge=1, le=3_600_000, description="Target time to first token."
    )
    inter_token_latency_milliseconds: Optional[int] = Field(
        None, ge=1, le=60_000, description="Target time between output tokens."
    )


class Autoscaling(KubeModel):
    """Scale replicas on KV-cache pressure (used KV blocks / total KV blocks)."""

    enabled: bool = Field(False, description="Let the operator change spec.replicas.")
    target_kv_pressure_percent: int = Field(
        75, ge=1, le=100, description="Average KV-cache utilization to hold replicas at."
    )
    scale_up_stabilization_seconds: int = Field(
        0, ge=0, le=3600, description="Window over which the lowest recommendation wins."
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=3600, description="Window over which the highest recommendation wins."
    )
    cooldown_seconds: int = Field(
        60, ge=0, le=3600, description="Minimum time between two scaling actions."
    )


Spread = Literal["gpu", "node", "none"]


class ReplicaPlacement(KubeModel):
    """How the replicas of one Model stand towards each other on the fleet's GPUs."""

    spread: Spread = Field(
        "node",
        description="Failure domain the replicas are spread over, so that losing one "
        "never takes the whole Model down. node: no two replicas on one node while a node "
        "without one has room for it; gpu: no two replicas on one GPU while a GPU without "
        "one has room (they may share a node); none: replicas pack as tightly as any, on "
        "one GPU if it holds them. When every node (or GPU) with room already holds a "
        "replica, the rest go to the least crowded ones (replicas sharing a node pack "
        "there as any) and the Model's Spread condition says so. Spreading never gives a "
        "replica more GPUs than it takes on its best-fitting product (it shares a node "
        "first). Changing it replaces the replicas one at a time, make-before-break.",
    )


# Container resource names as a pod takes them: the standard ones, or an extended
# resource named domain/name (kubernetes.io names are reserved). Hugepages are not
# offered to workers.
RESOURCE_NAME = (
    r"^(cpu|memory|ephemeral-storage|"
    r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*"
    r"/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"
)
_RESOURCE_NAME = re.compile(RESOURCE_NAME)
MAX_RESOURCES = 16


def _resource_name_ok(name: str) -> bool:
    return (len(name) <= 253 and _RESOURCE_NAME.fullmatch(name) is not None
            and "kubernetes.io/" not in name)


def _operator_owned(name: str) -> bool:
    return name == "nvidia.com/gpu" or name.startswith("nvidia.com/mig-")


def _whole(value: int | str) -> bool:
    try:
        return parse_quantity(value).denominator == 1
    except ValueError:
        return True  # reported by the value's own check


ResourceList = Annotated[
    dict[str, ResourceQuantity],
    Field(max_length=MAX_RESOURCES),
    *checked(
        Rule(
            "self.all(k, k.size() <= 253 && !k.contains('kubernetes.io/') && "
            f"k.matches(r'{RESOURCE_NAME}'))",
            "resource names are cpu, memory, ephemeral-storage or an extended resource "
            "named domain/name, such as example.com/device",
            lambda m: all(_resource_name_ok(k) for k in m),
        ),
        Rule(
            "self.all(k, k != 'nvidia.com/gpu' && !k.startsWith('nvidia.com/mig-'))",
            "must not name nvidia.com/gpu or nvidia.com/mig-* resources: the operator "
            "gives each replica its GPUs from the placement",
            lambda m: not any(_operator_owned(k) for k in m),
        ),
        Rule(
            "self.all(k, !k.contains('/') || type(self[k]) == int || "
            f"(self[k].matches(r'{RESOURCE_QUANTITY_PATTERN}') && "
            "quantity(self[k]).isInteger()))",
            "extended resources (domain/name) must be whole numbers",
            lambda m: all(_whole(v) for k, v in m.items() if "/" in k),
        ),
    ),
]


def _compare(a: int | str, b: int | str) -> Optional[int]:
    """-1, 0 or 1 as quantity a is below, equal to or above b; None if either is bad."""
    try:
        x, y = parse_quantity(a), parse_quantity(b)
    except ValueError:
        return None
    return (x > y) - (x < y)


def _q(side: str) -> str:
    return f"quantity(string(self.{side}[k]))"


_BOTH_VALID = "isQuantity(string(self.requests[k])) && isQuantity(string(self.limits[k]))"


class Resources(KubeModel):
    """CPU and memory for the worker container (GPUs are added by the operator)."""

    # Checked as Kubernetes checks a container's resources, so the operator never builds
    # a pod the API server refuses: known names, non-negative quantities, requests at
    # most the limits, extended resources whole and not overcommitted.

    requests: ResourceList = Field(
        default_factory=dict, description="Resources the worker container requests."
    )
    limits: ResourceList = Field(
        default_factory=dict, description="Resources the worker container may use at most."
    )

    RULES = (
        Rule(
            "!has(self.requests) || !has(self.limits) || self.requests.all(k, "
            f"!(k in self.limits) || !({_BOTH_VALID}) || "
            f"{_q('requests')}.compareTo({_q('limits')}) <= 0)",
            "requests must not exceed limits (lower the request or raise the limit)",
            lambda r: all(_compare(v, r.limits[k]) != 1 for k, v in r.requests.items()
                          if k in r.limits),
            ".requests",
        ),
        Rule(
            "!has(self.requests) || self.requests.all(k, !k.contains('/') || "
            "(has(self.limits) && k in self.limits && "
            f"(!({_BOTH_VALID}) || {_q('requests')}.compareTo({_q('limits')}) == 0)))",
            "an extended resource (domain/name) needs a limit equal to its request (it "
            "cannot be overcommitted; giving only the limit sets both)",
            lambda r: all(k in r.limits and _compare(v, r.limits[k]) in (0, None)
                          for k, v in r.requests.items() if "/" in k),
            ".limits",
        ),
    )


# An image reference as container runtimes parse it: [registry[:port]/]path[:tag][@digest].
IMAGE_PATTERN = rf"^{IMAGE_REFERENCE}$"

EngineArg = Annotated[
    str,
    Field(max_length=1024),
    *checked(Rule(
        "self.size() >= 1 && !self.contains('\\x00')",
        "engineArgs entries must be non-empty and hold no NUL character (a process "
        "argument cannot)",
        lambda a: len(a) >= 1 and "\x00" not in a,
    )),
]


class WorkerSpec(KubeModel):
    """How worker pods are run."""

    image: Annotated[
        str,
        Field(max_length=512),
        *checked(Rule(
            f"self.matches(r'{IMAGE_PATTERN}')",
            "image must be a container image reference such as "
            "registry.example.com/kvpilot/worker:0.1.0 ([registry/]path[:tag][@digest], "
            "the path in lowercase)",
            _matches(IMAGE_PATTERN),
        )),
    ] = Field("kvpilot/worker:0.1.0", description="Worker image.")
    resources: Resources = Field(default_factory=Resources)
    engine_args: list[EngineArg] = Field(
        default_factory=list, max_length=64, description="Extra engine command-line flags."
    )


TensorParallel = _int_or_string(
    lambda value: value == "auto" or value in TENSOR_PARALLEL_DEGREES,
    "type(self) == string ? self == 'auto' : "
    f"self in [{', '.join(map(str, TENSOR_PARALLEL_DEGREES))}]",
    "tensorParallel must be 'auto' or one of "
    f"{', '.join(map(str, TENSOR_PARALLEL_DEGREES))} (GPUs per replica)",
    4,
)

# nvidia.com/gpu.product is a node label, so an allowed product is a label value.
LABEL_VALUE = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
GPUProduct = Annotated[
    str,
    Field(max_length=63),
    *checked(Rule(
        f"self.matches(r'{LABEL_VALUE}')",
        "gpuProducts entries are nvidia.com/gpu.product label values such as "
        "NVIDIA-H100-80GB-HBM3 (letters, digits, '-', '_' and '.', at most 63)",
        _matches(LABEL_VALUE),
    )),
]


def _tp_fits_kv_heads(spec: "ModelSpec") -> bool:
    tp, kv = spec.tensor_parallel, spec.architecture.kv_heads
    return tp == "auto" or kv % tp == 0 or tp % kv == 0


def _tp_fits_attention_heads(spec: "ModelSpec") -> bool:
    tp = spec.tensor_parallel
    return tp == "auto" or spec.architecture.attention_heads % tp == 0


def _source_rule(scheme: str) -> Rule:
    pattern = re.compile(SOURCE_PATTERNS[scheme])
    return Rule(
        f"!self.startsWith('{scheme}://') || self.matches(r'{SOURCE_PATTERNS[scheme]}')",
        SOURCE_MESSAGES[scheme],
        lambda s: not s.startswith(f"{scheme}://") or pattern.fullmatch(s) is not None,
    )


Source = Annotated[
    str,
    Field(max_length=2048),
    *checked(
        Rule(
            " || ".join(f"self.startsWith('{s}://')" for s in SCHEMES),
            UNKNOWN_SCHEME,
            lambda s: scheme_of(s) is not None,
        ),
        *(_source_rule(s) for s in SCHEMES),
    ),
]
# A Secret name (a DNS subdomain).
SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ModelSpec(KubeModel):
    """A model to serve, the context it must serve, and how many replicas."""

    source: Optional[Source] = Field(
        None,
        description="Where the weights come from: hf://ORG/NAME[@REVISION] (downloaded into "
        "a node-local cache), pvc://CLAIM[/SUBPATH], oci://IMAGE[:TAG|@DIGEST] (an image "
        "volume), host:///PATH (a directory on every GPU node) or file:///PATH (inside the "
        "worker image). Mounted read-only; the worker checks the checkpoint against "
        "weights and architecture before it serves.",
    )
    source_secret: Optional[str] = Field(
        None, max_length=253, pattern=SECRET_NAME,
        description="For hf:// sources: a Secret in the Model's namespace whose HF_TOKEN "
        "key is the hub token (gated or private repositories).",
    )
    weights: Weights
    architecture: Architecture
    kv_cache_dtype: KVCacheDtype = Field("bf16", description="Data type of the KV cache.")
    sla: ContextSLA
    replicas: int = Field(1, ge=0, le=10_000, description="Desired replicas (scale target).")
    min_replicas: int = Field(1, ge=0, le=10_000, description="Lower bound for replicas.")
    max_replicas: Optional[int] = Field(
        None, ge=1, le=10_000, description="Upper bound for replicas."
    )
    tensor_parallel: TensorParallel = Field(
        "auto", description="GPUs per replica, or 'auto' for the fewest that fit."
    )
    gpu_products: list[GPUProduct] = Field(
        default_factory=list,
        max_length=32,
        description="Allowed nvidia.com/gpu.product values; empty allows any.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    runtime_overhead: Quantity = Field(
        "2Gi",
        description="HBM reserved per GPU for the CUDA context, activations and graphs.",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    # None (absent) means the defaults: Models stored before the field existed keep the
    # spec their pods' hash was taken of, so upgrading the operator replaces nothing.
    placement: Optional[ReplicaPlacement] = Field(
        None, description="How the replicas stand towards each other (spread); absent: "
        "spread node.")
    worker: WorkerSpec = Field(default_factory=WorkerSpec)

    RULES = (
        Rule(
            "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "minReplicas must be <= maxReplicas",
            lambda s: s.max_replicas is None or s.min_replicas <= s.max_replicas,
            ".minReplicas",
        ),
        Rule(
            "self.replicas >= self.minReplicas",
            "replicas must be >= minReplicas (lower minReplicas to scale further down)",
            lambda s: s.replicas >= s.min_replicas,
            ".replicas",
        ),
        Rule(
            "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "replicas must be <= maxReplicas (raise maxReplicas to scale further up)",
            lambda s: s.max_replicas is None or s.replicas <= s.max_replicas,
            ".replicas",
        ),
        Rule(
            "self.sla.contextTokens <= self.architecture.maxContextTokens",
            "sla.contextTokens must be <= architecture.maxContextTokens (the model "
            "cannot attend over more tokens than it supports)",
            lambda s: s.sla.context_tokens <= s.architecture.max_context_tokens,
            ".sla.contextTokens",
        ),
        Rule(
            "type(self.tensorParallel) == string || int(self.tensorParallel) < 1 || "
            "self.architecture.kvHeads < 1 || "
            "self.architecture.kvHeads % int(self.tensorParallel) == 0 || "
            "int(self.tensorParallel) % self.architecture.kvHeads == 0",
            "tensorParallel must divide architecture.kvHeads, or be a multiple of it "
            "(KV heads are then replicated); use 'auto' to let kvpilot choose",
            _tp_fits_kv_heads,
            ".tensorParallel",
        ),
        Rule(
            "type(self.tensorParallel) == string || int(self.tensorParallel) < 1 || "
            "self.architecture.attentionHeads % int(self.tensorParallel) == 0",
            "tensorParallel must divide architecture.attentionHeads (each GPU serves an "
            "equal share of the query heads); use 'auto' to let kvpilot choose",
            _tp_fits_attention_heads,
            ".tensorParallel",
        ),
        Rule(
            "!has(self.sourceSecret) || (has(self.source) && self.source.startsWith('hf://'))",
            "sourceSecret holds a hub token (HF_TOKEN): it is for hf:// sources only",
            lambda s: s.source_secret is None or (s.source or "").startswith("hf://"),
            ".sourceSecret",
        ),
        Rule(
            "!self.autoscaling.enabled || has(self.maxReplicas)",
            "autoscaling.enabled needs maxReplicas as the upper bound",
            lambda s: not s.autoscaling.enabled or s.max_replicas is not None,
            ".maxReplicas",
        ),
    )

    @property
    def replica_ceiling(self) -> int:
        """The most replicas: ``maxReplicas``, else ``replicas``."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    @property
    def spread(self) -> str:
        """``placement.spread``, its default when absent."""
        placement = self.placement or ReplicaPlacement()
        return placement.spread

    @property
    def desired_replicas(self) -> int:
        """``replicas`` within ``minReplicas`` and the ceiling: what the operator runs."""
        return max(self.min_replicas, min(self.replicas, self.replica_ceiling))

    @field_validator("gpu_products")
    @classmethod
    def _no_repeats(cls, products: list[str]) -> list[str]:
        # The API server refuses these itself (a list of type set); files get the same.
        repeated = sorted({p for p in products if products.count(p) > 1})
        if repeated:
            raise PydanticCustomError(
                "duplicate", "gpuProducts lists {repeated} more than once",
                {"repeated": ", ".join(repeated)})
        return products


class Placement(KubeModel):
    """Where one replica runs."""

    replica: str = Field(description="Replica (worker pod) name.")
    node: str = Field(description="Node the replica is placed on.")
    gpus: list[int] = Field(default_factory=list, description="GPU indices on that node.")
    shared: bool = Field(False, description="True when another replica shares these GPUs.")


class Condition(KubeModel):
    """A standard Kubernetes condition (Placed, Ready, Unschedulable...)."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    observed_generation: Optional[int] = Field(None, ge=0)


class ModelStatus(KubeModel):
    """Observed state, written by the operator."""

    replicas: int = Field(0, ge=0, description="Replicas that exist (placed or not).")
    ready_replicas: int = Field(0, ge=0, description="Replicas serving requests.")
    selector: Optional[str] = Field(None, description="Label selector of the worker pods.")
    tensor_parallel: Optional[int] = Field(None, ge=1, description="Resolved GPUs per replica.")
    hbm_per_gpu: Optional[str] = Field(None, description="HBM one replica needs on each GPU.")
    kv_capacity_tokens: Optional[int] = Field(
        None, ge=0, description="KV-cache tokens one replica can hold."
    )
    kv_pressure_percent: Optional[int] = Field(
        None, ge=0, le=100, description="Mean KV-cache utilization over ready replicas."
    )
    reason: Optional[str] = Field(
        None, max_length=64, description="Why fewer replicas are ready than desired, in "
        "one word (the Degraded reason, Unschedulable, FetchingWeights, Draining or "
        "Starting); absent while every desired replica is ready.",
    )
    endpoint: Optional[str] = Field(
        None, max_length=512, description="OpenAI base URL of the Model's Service "
        "(http://NAME.NAMESPACE.svc/v1), which sends requests to its ready, non-draining "
        "replicas.",
    )
    placements: list[Placement] = Field(default_factory=list)
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: Optional[int] = Field(None, ge=0)


class ObjectMeta(BaseModel):
    """The part of metadata kvpilot reads; anything else is kept as is."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str = Field(max_length=253)
    namespace: Optional[str] = Field(None, max_length=63, pattern=DNS_LABEL)


def _name_ok(model: "Model") -> bool:
    return re.fullmatch(DNS_LABEL, model.metadata.name) is not None


class Model(KubeModel):
    """A Model resource as a whole, as loaded from a file or read from the API."""

    api_version: Literal["kvpilot.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["Model"] = KIND
    metadata: ObjectMeta
    spec: ModelSpec
    status: Optional[ModelStatus] = None

    # On the root of the CRD schema, where CEL sees metadata.name.
    RULES = (
        Rule(
            f"self.metadata.name.size() <= {MAX_MODEL_NAME}",
            f"metadata.name must be at most {MAX_MODEL_NAME} characters (replica pod "
            "names and label values are derived from it and hold at most 63)",
            lambda m: len(m.metadata.name) <= MAX_MODEL_NAME,
            ".metadata.name",
        ),
        Rule(
            f"self.metadata.name.matches(r'{DNS_LABEL}')",
            "metadata.name must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. llama-3-1-70b)",
            _name_ok,
            ".metadata.name",
        ),
    )
