"""The Model custom resource (group kvpilot.dev, version v1alpha1) as pydantic models.

These classes are the single source of the API: the CRD in ``crds/`` is generated from
them (``python -m kvpilot.api.crd``), and the operator, planner and worker load specs
through them. Cross-field rules are written once, as :class:`Rule` objects that carry a
CEL expression for the API server, a Python check for files loaded locally, and the one
human message both give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kvpilot.api.quantity import QUANTITY_PATTERN, parse_bytes

GROUP = "kvpilot.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Model"
PLURAL = "models"

WeightDtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]
KVCacheDtype = Literal["bf16", "fp16", "fp8"]

# A byte count: a plain integer or a Kubernetes quantity string ("16Gi", "500M").
Quantity = Annotated[
    Union[Annotated[int, Field(ge=0)], Annotated[str, Field(pattern=QUANTITY_PATTERN)]],
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": f"type(self) == int ? self >= 0 : self.matches(r'{QUANTITY_PATTERN}')",
                    "message": "must be a byte count: an integer or a quantity such as "
                    "16Gi, 500Mi or 8G",
                }
            ],
        }
    ),
]
# Any container resource quantity ("500m" CPU, "4Gi" memory); the pod's own validation
# is the authority on these, so they are passed through as Kubernetes accepts them.
ResourceQuantity = Annotated[
    Union[int, Annotated[str, Field(pattern=r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
                                            r"(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")]],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
MAX_TENSOR_PARALLEL = 16


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, enforced by the API server (CEL) and by pydantic (``check``).

    ``check`` receives the pydantic object the rule is attached to (CEL's ``self``) and
    returns True when the rule holds. ``message`` is what a user sees in both places.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]

    def schema(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


class KubeModel(BaseModel):
    """Base: camelCase JSON names, unknown fields refused, rules checked after parsing."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> "KubeModel":
        broken = [rule.message for rule in self.RULES if not rule.check(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


class Weights(KubeModel):
    """How large the weights are: a parameter count times the dtype width, or bytes."""

    parameters: Optional[int] = Field(
        None, ge=1, description="Parameter count, e.g. 8030261248 for Llama-3-8B."
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


class Architecture(KubeModel):
    """The transformer shape that sizes the KV cache."""

    layers: int = Field(ge=1, le=1024, description="Number of transformer layers.")
    attention_heads: int = Field(ge=1, le=1024, description="Query heads per layer.")
    kv_heads: int = Field(ge=1, le=1024, description="Key/value heads per layer (GQA groups).")
    head_dim: int = Field(ge=8, le=1024, description="Dimension of one attention head.")
    max_context_tokens: int = Field(
        ge=1, le=16_777_216, description="Longest context the model supports, in tokens."
    )

    RULES = (
        Rule(
            "self.attentionHeads % self.kvHeads == 0",
            "kvHeads must divide attentionHeads (each KV head serves a whole group of "
            "query heads)",
            lambda a: a.attention_heads % a.kv_heads == 0,
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


class Resources(KubeModel):
    """CPU and memory for the worker container (GPUs are added by the operator)."""

    requests: dict[str, ResourceQuantity] = Field(default_factory=dict)
    limits: dict[str, ResourceQuantity] = Field(default_factory=dict)


class WorkerSpec(KubeModel):
    """How worker pods are run."""

    image: str = Field(
        "kvpilot/worker:0.1.0", min_length=1, max_length=512, description="Worker image."
    )
    resources: Resources = Field(default_factory=Resources)
    engine_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra engine command-line flags."
    )


TensorParallel = Annotated[
    Union[Annotated[int, Field(ge=1, le=MAX_TENSOR_PARALLEL)], Literal["auto"]],
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self == 'auto' : "
                    f"(self >= 1 && self <= {MAX_TENSOR_PARALLEL})",
                    "message": "tensorParallel must be 'auto' or an integer from 1 to "
                    f"{MAX_TENSOR_PARALLEL}",
                }
            ],
        }
    ),
]


def _tp_fits_kv_heads(spec: "ModelSpec") -> bool:
    tp, kv = spec.tensor_parallel, spec.architecture.kv_heads
    return tp == "auto" or kv % tp == 0 or tp % kv == 0


class ModelSpec(KubeModel):
    """A model to serve, the context it must serve, and how many replicas."""

    source: Optional[str] = Field(
        None, max_length=2048, description="Where the weights come from (directory or URI)."
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
    gpu_products: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
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
    worker: WorkerSpec = Field(default_factory=WorkerSpec)

    RULES = (
        Rule(
            "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "minReplicas must be <= maxReplicas",
            lambda s: s.max_replicas is None or s.min_replicas <= s.max_replicas,
        ),
        Rule(
            "self.replicas >= self.minReplicas",
            "replicas must be >= minReplicas (lower minReplicas to scale further down)",
            lambda s: s.replicas >= s.min_replicas,
        ),
        Rule(
            "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "replicas must be <= maxReplicas (raise maxReplicas to scale further up)",
            lambda s: s.max_replicas is None or s.replicas <= s.max_replicas,
        ),
        Rule(
            "self.sla.contextTokens <= self.architecture.maxContextTokens",
            "sla.contextTokens must be <= architecture.maxContextTokens (the model "
            "cannot attend over more tokens than it supports)",
            lambda s: s.sla.context_tokens <= s.architecture.max_context_tokens,
        ),
        Rule(
            "type(self.tensorParallel) == string || "
            "self.architecture.kvHeads % int(self.tensorParallel) == 0 || "
            "int(self.tensorParallel) % self.architecture.kvHeads == 0",
            "tensorParallel must divide architecture.kvHeads, or be a multiple of it "
            "(KV heads are then replicated); use 'auto' to let kvpilot choose",
            _tp_fits_kv_heads,
        ),
        Rule(
            "!self.autoscaling.enabled || has(self.maxReplicas)",
            "autoscaling.enabled needs maxReplicas as the upper bound",
            lambda s: not s.autoscaling.enabled or s.max_replicas is not None,
        ),
    )

    @field_validator("runtime_overhead")
    @classmethod
    def _quantity_parses(cls, value: int | str) -> int | str:
        parse_bytes(value)
        return value


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
    placements: list[Placement] = Field(default_factory=list)
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: Optional[int] = Field(None, ge=0)


class ObjectMeta(BaseModel):
    """The part of metadata kvpilot reads; anything else is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=253)
    namespace: Optional[str] = None


class Model(KubeModel):
    """A Model resource as a whole, as loaded from a file or read from the API."""

    model_config = ConfigDict(extra="ignore")
    api_version: Literal["kvpilot.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["Model"] = KIND
    metadata: ObjectMeta
    spec: ModelSpec
    status: Optional[ModelStatus] = None
