"""Operator settings: one pydantic model, filled from flags and ``KVPILOT_*`` env vars.

The Helm chart passes its values as env vars, the CLI as flags; both end up here and are
validated once, at start-up, with a message that names the setting.
"""

from __future__ import annotations

import os
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvpilot.api.contract import WORKER_PORT

ENV_PREFIX = "KVPILOT_"
RealizationMode = Literal["auto", "dra", "devicePlugin"]
PoolMode = Literal["auto", "true", "false"]


class Settings(BaseModel):
    """How the operator realizes plans and how often it looks at the fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RealizationMode = Field(
        "auto", description="dra: ResourceClaims with consumable GPU memory (GPUs shared by "
        "HBM budget); devicePlugin: whole nvidia.com/gpu per replica, no sharing; auto: dra "
        "when the GPU driver publishes ResourceSlices with consumable memory.")
    dra_driver: str = Field("gpu.nvidia.com", min_length=1,
                            description="DRA driver whose ResourceSlices describe the GPUs.")
    device_class: str = Field("gpu.nvidia.com", min_length=1,
                              description="DeviceClass the replicas' claims ask for.")
    worker_image: str | None = Field(
        None, description="Image for workers whose Model keeps the default image.")
    weights_cache_dir: str = Field(
        "/var/cache/kvpilot/models", pattern=r"^(/[A-Za-z0-9_.+=@/-]*)?$", description="Directory on each GPU node that hf:// "
        "weights are fetched into and shared from (one download per node and revision); "
        "empty: an emptyDir per worker pod (a download per replica start).")
    hub_endpoint: str = Field(
        "", pattern=r"^(https?://\S+)?$", description="Hugging Face hub (or mirror) that hf:// sources are fetched from "
        "(HF_ENDPOINT); empty: the public hub.")
    worker_port: int = Field(WORKER_PORT, ge=1, le=65535)
    worker_command: tuple[str, ...] = Field(("python", "-m", "kvpilot.worker"), min_length=1)
    reconcile_seconds: float = Field(30.0, gt=0, le=3600,
                                     description="Longest time between two fleet passes.")
    debounce_seconds: float = Field(0.2, ge=0, le=60,
                                    description="Quiet time gathered after a change before a pass.")
    scrape_seconds: float = Field(15.0, gt=0, le=3600,
                                  description="Interval between scrapes of worker metrics.")
    scrape_timeout_seconds: float = Field(2.0, gt=0, le=60)
    drain_timeout_seconds: float = Field(120.0, ge=0, le=86400,
                                         description="Longest wait for a worker to drain.")
    scale_up_headroom_seconds: float = Field(
        60.0, ge=0, le=3600, description="How far ahead the autoscaler projects a Model's "
        "rising demand when it scales up: a replica's start-up (weights download when its "
        "node does not cache them, load, graph capture), so that capacity asked for now "
        "serves when the demand arrives; 0: no look-ahead.")
    demand_trend_seconds: float = Field(
        60.0, gt=0, le=3600, description="Seconds of scrape samples the demand trend "
        "(running and waiting requests) is fitted over.")
    latency_miss_budget: float = Field(
        0.01, ge=0, le=1, description="Share of a scrape round's first tokens (or token "
        "gaps) over the Model's TTFT (ITL) target, from the workers' histograms, that asks "
        "for another replica and holds off scale-down; 1: latency is not looked at.")
    not_ready_grace_seconds: float = Field(
        60.0, ge=0, le=3600, description="How long a NotReady node keeps its replicas "
        "before they are placed elsewhere (it takes nothing new meanwhile).")
    reserved_pods_per_node: int = Field(
        10, ge=0, le=1000, description="Pods of other workloads (daemon sets) a GPU node's "
        "allocatable pods keep room for; the rest bound its replicas.")
    reserve: float = Field(0.0, ge=0, lt=1, description="Fraction of every GPU's HBM kept free.")
    packing: float = Field(1.0, ge=0, le=1,
                           description="1 packs replicas onto few GPUs, 0 spreads them.")
    namespace: str = Field("kvpilot-system", min_length=1,
                           description="Namespace of the operator's Lease.")
    lease_name: str = Field("kvpilot-operator", min_length=1)
    lease_seconds: float = Field(15.0, ge=2, le=600)
    identity: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", "")
                          or f"kvpilot-{os.getpid()}")
    metrics_port: int = Field(8080, ge=0, le=65535, description="0 turns /metrics off.")
    health_port: int = Field(8081, ge=0, le=65535, description="0 turns /healthz off.")
    write_concurrency: int = Field(16, ge=1, le=256,
                                   description="API writes in flight at once.")
    inference_pool: PoolMode = Field(
        "auto", description="An InferencePool (Gateway API Inference Extension, "
        "inference.networking.k8s.io/v1) per Model. auto: while its CRD is served (it is "
        "watched, so installing it later is enough); true: the same, and a missing CRD is "
        "a warning; false: never, and InferencePools are not watched.")
    endpoint_picker: str = Field(
        "{model}-epp", max_length=63, pattern=r"^([a-z0-9-]|\{model\})*$",
        description="The endpoint picker Service every InferencePool names, {model} "
        "standing for the Model's name; empty: none (CRDs from v1.5 on allow that).")
    endpoint_picker_port: int = Field(9002, ge=1, le=65535,
                                      description="Port of the endpoint picker Service.")
    endpoint_picker_failure_mode: Literal["FailClose", "FailOpen"] = Field(
        "FailClose", description="What a gateway does when the endpoint picker does not "
        "answer: refuse the request, or send it to an endpoint of its own choosing.")

    @field_validator("inference_pool", mode="before")
    @classmethod
    def _pool_mode(cls, value: object) -> object:
        if isinstance(value, bool):  # a YAML true/false, given as an override
            return "true" if value else "false"
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from ``KVPILOT_<NAME>`` env vars (upper snake case), then overrides."""
        env = os.environ if env is None else env
        values: dict = {}
        for name, field in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if name == "worker_command":
                values[name] = tuple(raw.split())
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                for e in err.errors())
            raise ValueError(f"invalid operator settings: {problems}") from err
