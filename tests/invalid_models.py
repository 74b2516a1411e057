"""Model documents that the API server, the loader (and so ``kvpilot plan``) and pydantic
must treat alike, one table per class of input.

``INVALID``: refused everywhere, with the message naming the field (``field`` on the
loader's side, ``server_field`` on the API server's when it spells the path differently)
and the fix. ``VALID``: edge cases accepted everywhere, and planned without a traceback.
Documents are built on top of ``llama_spec()`` by ``document()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

ARCH = {"layers": 32, "attentionHeads": 32, "kvHeads": 8, "headDim": 128,
        "maxContextTokens": 8192}
QWEN_ARCH = {"layers": 24, "attentionHeads": 14, "kvHeads": 2, "headDim": 64,
             "maxContextTokens": 32768}
# Phi-3-mini: 32 heads of 96, no GQA.
PHI3_ARCH = {"layers": 32, "attentionHeads": 32, "kvHeads": 32, "headDim": 96,
             "maxContextTokens": 4096}
# Sliding-window and latent attention, as the examples state them.
ATTENTION_ARCH = {
    p.stem: yaml.safe_load(p.read_text())["spec"]["architecture"]
    for p in (Path(__file__).parent.parent / "examples" / "attention").glob("*.yaml")
}
MLA = {"attention": "mla", "mla": {"kvLoraRank": 512, "qkRopeHeadDim": 64}}
LONGEST_NAME = "m" + "-0123456789abcdefghijklmnopqrstuvwxyz" + "x" * 12  # 50 characters
BYTES = "must be a byte count: an integer or a quantity such as 16Gi, 500Mi or 8G, at most 1Pi"
QUANTITY = "must be a non-negative quantity such as 500m, 2, 4Gi or 1e3"
TP = "tensorParallel must be 'auto' or one of 1, 2, 4, 8, 16"
IMAGE = "image must be a container image reference"
RESOURCE_NAMES = "resource names are cpu, memory, ephemeral-storage or an extended resource"
GPUS = "must not name nvidia.com/gpu or nvidia.com/mig-* resources"
ENGINE_ARGS = "engineArgs entries must be non-empty and hold no NUL character"
PRODUCTS = "gpuProducts entries are nvidia.com/gpu.product label values"
DNS = "metadata.name must be a DNS label"
UNKNOWN_SCHEME = "source must start with hf://, pvc://, oci://, host:// or file://"
HF = "source hf:// must be hf://ORG/NAME or hf://ORG/NAME@REVISION"
PVC = "source pvc:// must be pvc://CLAIM or pvc://CLAIM/SUBPATH"
OCI = "source oci:// must be oci://IMAGE[:TAG][@DIGEST]"
HOST = "source host:// must be host:///PATH"
FILE = "source file:// must be file:///PATH"


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]  # overrides merged into llama_spec() at the top; None deletes
    field: str  # where the loader reports it
    message: str  # what both say, unless loader/server below say otherwise
    loader: Optional[str] = None
    server: Optional[str] = None
    server_field: Optional[str] = None
    name: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys of the document

    @property
    def loader_text(self) -> str:
        return self.loader or self.message

    @property
    def server_text(self) -> str:
        return self.server or self.message


def _worker(**kw: Any) -> dict[str, Any]:
    return {"worker": kw}


def _res(**kw: Any) -> dict[str, Any]:
    return {"worker": {"resources": kw}}


INVALID: list[Case] = [
    # --- cross-field rules, reported at the field they name -------------------------
    Case("min-gt-max", {"minReplicas": 3, "maxReplicas": 2, "replicas": 2},
         "spec.minReplicas", "minReplicas must be <= maxReplicas"),
    Case("below-min", {"replicas": 0}, "spec.replicas", "replicas must be >= minReplicas"),
    Case("above-max", {"replicas": 5, "maxReplicas": 4},
         "spec.replicas", "replicas must be <= maxReplicas"),
    Case("context-too-long", {"sla": {"contextTokens": 9000, "concurrentSequences": 1}},
         "spec.sla.contextTokens", "sla.contextTokens must be <= architecture.maxContextTokens"),
    Case("autoscaling-no-max", {"autoscaling": {"enabled": True}},
         "spec.maxReplicas", "autoscaling.enabled needs maxReplicas"),
    Case("weights-empty", {"weights": {"dtype": "bf16"}},
         "spec.weights", "weights needs parameters"),
    Case("kv-heads-not-divisor", {"architecture": {**ARCH, "kvHeads": 6}},
         "spec.architecture.kvHeads", "kvHeads must divide attentionHeads"),
    Case("kv-heads-zero", {"architecture": {**ARCH, "kvHeads": 0}},
         "spec.architecture.kvHeads", "greater than or equal to 1",
         server="should be greater than or equal to 1"),
    Case("missing-sla", {"sla": None}, "spec.sla", "Field required", server="Required value"),
    Case("zero-sequences", {"sla": {"contextTokens": 1024, "concurrentSequences": 0}},
         "spec.sla.concurrentSequences", "greater than or equal to 1"),
    Case("kv-dtype", {"kvCacheDtype": "int3"}, "spec.kvCacheDtype",
         "'bf16', 'fp16' or 'fp8'", server='Unsupported value: "int3"'),
    # --- 1. quantities: bounded in grammar and value ----------------------------------
    Case("bytes-words", {"weights": {"bytes": "16 gigs"}}, "spec.weights.bytes", BYTES),
    Case("bytes-huge-exponent", {"weights": {"bytes": "1e999999"}}, "spec.weights.bytes", BYTES),
    Case("bytes-exponent-above-1pi", {"weights": {"bytes": "9e18"}},
         "spec.weights.bytes", BYTES),
    Case("bytes-2pi", {"weights": {"bytes": "2Pi"}}, "spec.weights.bytes", BYTES),
    Case("bytes-exbibytes", {"weights": {"bytes": "1Ei"}}, "spec.weights.bytes", BYTES),
    Case("bytes-int-above-1pi", {"weights": {"bytes": 2**50 + 1}}, "spec.weights.bytes", BYTES),
    Case("bytes-many-digits", {"weights": {"bytes": "1" * 30}}, "spec.weights.bytes", BYTES),
    Case("bytes-long-fraction", {"weights": {"bytes": "1." + "0" * 40 + "1Gi"}},
         "spec.weights.bytes", BYTES),
    Case("bytes-bool", {"weights": {"bytes": True}}, "spec.weights.bytes", BYTES,
         server="must be of type integer,string"),
    Case("bytes-float", {"weights": {"bytes": 1.5}}, "spec.weights.bytes", BYTES,
         server="must be of type integer,string"),
    Case("overhead-negative", {"runtimeOverhead": "-1Gi"}, "spec.runtimeOverhead", BYTES),
    Case("overhead-negative-int", {"runtimeOverhead": -1}, "spec.runtimeOverhead", BYTES),
    Case("overhead-milli", {"runtimeOverhead": "500m"}, "spec.runtimeOverhead", BYTES),
    Case("overhead-whitespace", {"runtimeOverhead": " 2Gi"}, "spec.runtimeOverhead", BYTES),
    Case("overhead-lowercase-suffix", {"runtimeOverhead": "1.5gi"},
         "spec.runtimeOverhead", BYTES),
    Case("parameters-above-bound", {"weights": {"parameters": 2**48 + 1}},
         "spec.weights.parameters", "less than or equal to 281474976710656"),
    # --- 2. names: a DNS label of at most 50 characters -------------------------------
    Case("name-51", {}, "metadata.name", "metadata.name must be at most 50 characters",
         name=LONGEST_NAME + "x"),
    Case("name-253", {}, "metadata.name", "metadata.name must be at most 50 characters",
         name="a" * 253),
    Case("name-with-dot", {}, "metadata.name", DNS, name="llama-3.1-70b"),
    Case("name-uppercase", {}, "metadata.name", DNS,
         server="a lowercase RFC 1123 subdomain", name="Llama"),
    Case("name-trailing-dash", {}, "metadata.name", DNS,
         server="a lowercase RFC 1123 subdomain", name="llama-"),
    Case("name-not-a-string", {}, "metadata.name", "Input should be a valid string",
         server="cannot unmarshal number", server_field="ObjectMeta.name", name=12345),
    # --- 3. what a replica cannot be split into ---------------------------------------
    Case("tp-3", {"tensorParallel": 3}, "spec.tensorParallel", TP),
    Case("tp-6", {"architecture": {**ARCH, "attentionHeads": 48, "kvHeads": 6},
                  "tensorParallel": 6}, "spec.tensorParallel", TP),
    Case("tp-32", {"tensorParallel": 32}, "spec.tensorParallel", TP),
    Case("tp-zero", {"tensorParallel": 0}, "spec.tensorParallel", TP),
    Case("tp-negative", {"tensorParallel": -2}, "spec.tensorParallel", TP),
    Case("tp-word", {"tensorParallel": "two"}, "spec.tensorParallel", TP),
    Case("tp-capital-auto", {"tensorParallel": "Auto"}, "spec.tensorParallel", TP),
    Case("tp-string-number", {"tensorParallel": "2"}, "spec.tensorParallel", TP),
    Case("tp-bool", {"tensorParallel": True}, "spec.tensorParallel", TP,
         server="must be of type integer,string"),
    Case("tp-not-kv-divisor", {"architecture": {**ARCH, "attentionHeads": 48, "kvHeads": 12},
                               "tensorParallel": 8},
         "spec.tensorParallel", "tensorParallel must divide architecture.kvHeads"),
    Case("tp-not-head-divisor", {"architecture": QWEN_ARCH, "tensorParallel": 4},
         "spec.tensorParallel", "tensorParallel must divide architecture.attentionHeads"),
    Case("tp-replicated-kv-not-head-divisor",
         {"architecture": {**ARCH, "attentionHeads": 40, "kvHeads": 8}, "tensorParallel": 16},
         "spec.tensorParallel", "tensorParallel must divide architecture.attentionHeads"),
    Case("head-dim-odd", {"architecture": {**ARCH, "headDim": 100}},
         "spec.architecture.headDim", "headDim must be a multiple of 8"),
    Case("head-dim-huge", {"architecture": {**ARCH, "headDim": 2048}},
         "spec.architecture.headDim", "less than or equal to 1024"),
    # --- attention: facts that contradict each other -----------------------------------
    Case("window-above-max-context",
         {"architecture": {**ARCH, "slidingWindow": {"tokens": 8193}}},
         "spec.architecture.slidingWindow.tokens",
         "slidingWindow.tokens must be <= maxContextTokens"),
    Case("window-pattern-longer-than-layers",
         {"architecture": {**ARCH, "slidingWindow": {"tokens": 4096, "localLayers": 30,
                                                     "globalLayers": 3}}},
         "spec.architecture.slidingWindow",
         "slidingWindow.localLayers + slidingWindow.globalLayers must be <= layers"),
    Case("window-zero", {"architecture": {**ARCH, "slidingWindow": {"tokens": 0}}},
         "spec.architecture.slidingWindow.tokens", "greater than or equal to 1"),
    Case("window-no-local-layers",
         {"architecture": {**ARCH, "slidingWindow": {"tokens": 4096, "localLayers": 0}}},
         "spec.architecture.slidingWindow.localLayers", "greater than or equal to 1"),
    Case("window-without-tokens", {"architecture": {**ARCH, "slidingWindow": {"globalLayers": 1}}},
         "spec.architecture.slidingWindow.tokens", "Field required", server="Required value"),
    Case("mla-dims-on-gqa", {"architecture": {**ARCH, "mla": MLA["mla"]}},
         "spec.architecture.mla", "mla dimensions are for attention: mla"),
    Case("mla-dims-on-explicit-gqa",
         {"architecture": {**ARCH, "attention": "gqa", "mla": MLA["mla"]}},
         "spec.architecture.mla", "mla dimensions are for attention: mla"),
    Case("mla-without-dims", {"architecture": {**ARCH, "kvHeads": 32, "attention": "mla"}},
         "spec.architecture.attention", "attention mla needs mla.kvLoraRank"),
    Case("mla-grouped-kv-heads", {"architecture": {**ARCH, **MLA}},
         "spec.architecture.kvHeads", "attention mla needs kvHeads equal to attentionHeads"),
    Case("mla-rope-as-wide-as-head",
         {"architecture": {**ARCH, **MLA, "kvHeads": 32,
                           "mla": {"kvLoraRank": 512, "qkRopeHeadDim": 128}}},
         "spec.architecture.mla.qkRopeHeadDim", "mla.qkRopeHeadDim must be less than headDim"),
    Case("mla-rank-above-bound",
         {"architecture": {**ARCH, **MLA, "kvHeads": 32,
                           "mla": {"kvLoraRank": 20000, "qkRopeHeadDim": 64}}},
         "spec.architecture.mla.kvLoraRank", "less than or equal to 16384"),
    Case("attention-unknown", {"architecture": {**ARCH, "attention": "mha"}},
         "spec.architecture.attention", "'gqa' or 'mla'", server='Unsupported value: "mha"'),
    # --- placement: a spread is one of three failure domains ---------------------------
    Case("spread-unknown", {"placement": {"spread": "rack"}}, "spec.placement.spread",
         "'gpu', 'node' or 'none'", server='Unsupported value: "rack"'),
    Case("spread-capitalized", {"placement": {"spread": "Node"}}, "spec.placement.spread",
         "'gpu', 'node' or 'none'", server='Unsupported value: "Node"'),
    Case("spread-bool", {"placement": {"spread": True}}, "spec.placement.spread",
         "'gpu', 'node' or 'none'", server="must be of type string"),
    Case("spread-empty", {"placement": {"spread": ""}}, "spec.placement.spread",
         "'gpu', 'node' or 'none'", server='Unsupported value: ""'),
    Case("placement-unknown-field", {"placement": {"spreads": "node"}}, "spec.placement.spreads",
         "Extra inputs are not permitted", server='unknown field "spec.placement.spreads"'),
    Case("placement-not-an-object", {"placement": "node"}, "spec.placement",
         "valid dictionary", server="must be of type object"),
    # --- 4. the worker section, checked as a container is -----------------------------
    Case("image-empty", _worker(image=""), "spec.worker.image", IMAGE),
    Case("image-uppercase-path", _worker(image="Kvpilot/Worker:1"), "spec.worker.image", IMAGE),
    Case("image-space", _worker(image="kvpilot/worker latest"), "spec.worker.image", IMAGE),
    Case("image-newline", _worker(image="kvpilot/worker:0.1.0\n"), "spec.worker.image", IMAGE),
    Case("image-empty-tag", _worker(image="kvpilot/worker:"), "spec.worker.image", IMAGE),
    Case("image-short-digest", _worker(image="kvpilot/worker@sha256:abc"),
         "spec.worker.image", IMAGE),
    Case("image-scheme", _worker(image="https://registry.example.com/worker"),
         "spec.worker.image", IMAGE),
    Case("image-too-long", _worker(image="r/" + "a" * 600), "spec.worker.image",
         "at most 512 characters", server="may not be more than 512 bytes"),
    Case("resource-unknown-name", _res(requests={"gpu": 1}),
         "spec.worker.resources.requests", RESOURCE_NAMES),
    Case("resource-hugepages", _res(limits={"hugepages-2Mi": "1Gi"}),
         "spec.worker.resources.limits", RESOURCE_NAMES),
    Case("resource-kubernetes-io", _res(limits={"kubernetes.io/foo": 1}),
         "spec.worker.resources.limits", RESOURCE_NAMES),
    Case("resource-bad-extended-name", _res(limits={"example.com/-dev": 1}),
         "spec.worker.resources.limits", RESOURCE_NAMES),
    Case("resource-nvidia-gpu", _res(requests={"nvidia.com/gpu": 1}, limits={"nvidia.com/gpu": 1}),
         "spec.worker.resources.requests", GPUS),
    Case("resource-mig", _res(limits={"nvidia.com/mig-1g.10gb": 1}),
         "spec.worker.resources.limits", GPUS),
    Case("resource-negative", _res(requests={"cpu": "-1"}),
         "spec.worker.resources.requests.cpu", QUANTITY,
         server_field="spec.worker.resources.requests[cpu]"),
    Case("resource-negative-int", _res(limits={"memory": -5}),
         "spec.worker.resources.limits.memory", QUANTITY,
         server_field="spec.worker.resources.limits[memory]"),
    Case("resource-huge-exponent", _res(requests={"cpu": "1e999"}),
         "spec.worker.resources.requests.cpu", QUANTITY,
         server_field="spec.worker.resources.requests[cpu]"),
    Case("resource-gb", _res(requests={"memory": "4GB"}),
         "spec.worker.resources.requests.memory", QUANTITY,
         server_field="spec.worker.resources.requests[memory]"),
    Case("resource-bool", _res(requests={"cpu": True}),
         "spec.worker.resources.requests.cpu", QUANTITY,
         server="must be of type integer,string"),
    Case("request-above-limit", _res(requests={"cpu": "2"}, limits={"cpu": "1500m"}),
         "spec.worker.resources.requests", "requests must not exceed limits"),
    Case("request-gi-above-g", _res(requests={"memory": "2Gi"}, limits={"memory": "2G"}),
         "spec.worker.resources.requests", "requests must not exceed limits"),
    Case("extended-fraction", _res(requests={"example.com/dev": "1.5"},
                                   limits={"example.com/dev": "1.5"}),
         "spec.worker.resources.requests", "extended resources (domain/name) must be whole"),
    Case("extended-overcommitted", _res(requests={"example.com/dev": 1},
                                        limits={"example.com/dev": 2}),
         "spec.worker.resources.limits", "needs a limit equal to its request"),
    Case("extended-no-limit", _res(requests={"example.com/dev": 1}),
         "spec.worker.resources.limits", "needs a limit equal to its request"),
    Case("resources-too-many", _res(limits={f"example.com/d{i}": 1 for i in range(17)}),
         "spec.worker.resources.limits", "at most 16 items", server="must have at most 16 items"),
    Case("engine-arg-empty", _worker(engineArgs=["--x", ""]), "spec.worker.engineArgs.1",
         ENGINE_ARGS, server_field="spec.worker.engineArgs[1]"),
    Case("engine-arg-nul", _worker(engineArgs=["--x\x00y"]), "spec.worker.engineArgs.0",
         ENGINE_ARGS, server_field="spec.worker.engineArgs[0]"),
    Case("engine-args-too-many", _worker(engineArgs=["-v"] * 65), "spec.worker.engineArgs",
         "at most 64 items", server="must have at most 64 items"),
    Case("engine-arg-too-long", _worker(engineArgs=["x" * 1025]), "spec.worker.engineArgs.0",
         "at most 1024 characters", server="may not be more than 1024 bytes",
         server_field="spec.worker.engineArgs[0]"),
    Case("gpu-product-space", {"gpuProducts": ["NVIDIA H100"]}, "spec.gpuProducts.0", PRODUCTS,
         server_field="spec.gpuProducts[0]"),
    Case("gpu-product-repeated", {"gpuProducts": ["NVIDIA-L4", "NVIDIA-L4"]},
         "spec.gpuProducts", "gpuProducts lists NVIDIA-L4 more than once",
         server='Duplicate value: "NVIDIA-L4"', server_field="spec.gpuProducts[1]"),
    # --- 5. types as strict as the API server's ---------------------------------------
    Case("replicas-string", {"replicas": "2"}, "spec.replicas", "Input should be a valid integer",
         server="must be of type integer"),
    Case("replicas-bool", {"replicas": True}, "spec.replicas", "Input should be a valid integer",
         server="must be of type integer"),
    Case("replicas-fraction", {"replicas": 1.5}, "spec.replicas",
         "Input should be a valid integer", server="must be of type integer"),
    Case("replicas-above-bound", {"replicas": 10**6, "maxReplicas": 10**6}, "spec.replicas",
         "less than or equal to 10000", server="should be less than or equal to 10000"),
    Case("enabled-string", {"autoscaling": {"enabled": "true"}}, "spec.autoscaling.enabled",
         "Input should be a valid boolean", server="must be of type boolean"),
    Case("layers-string", {"architecture": {**ARCH, "layers": "32"}},
         "spec.architecture.layers", "Input should be a valid integer",
         server="must be of type integer"),
    Case("unknown-spec-field", {"replica": 2}, "spec.replica",
         "Extra inputs are not permitted", server='unknown field "spec.replica"'),
    Case("unknown-top-level-field", {}, "specs", "Extra inputs are not permitted",
         server='unknown field "specs"', extra={"specs": {}}),
    Case("source-not-string", {"source": ["a"]}, "spec.source", "Input should be a valid string",
         server="must be of type string"),
    Case("source-bare-path", {"source": "/models/llama"}, "spec.source", UNKNOWN_SCHEME),
    Case("source-unknown-scheme", {"source": "s3://bucket/llama"}, "spec.source",
         UNKNOWN_SCHEME),
    Case("source-hf-no-org", {"source": "hf://llama"}, "spec.source", HF),
    Case("source-hf-double-dash", {"source": "hf://meta--llama/x"}, "spec.source", HF),
    Case("source-hf-three-parts", {"source": "hf://a/b/c"}, "spec.source", HF),
    Case("source-hf-empty-revision", {"source": "hf://a/b@"}, "spec.source", HF),
    Case("source-hf-revision-slash", {"source": "hf://a/b@refs/pr/1"}, "spec.source", HF),
    Case("source-pvc-uppercase", {"source": "pvc://Models/x"}, "spec.source", PVC),
    Case("source-pvc-dotdot", {"source": "pvc://models/../etc"}, "spec.source", PVC),
    Case("source-oci-space", {"source": "oci://registry.example.com/llama 3:v1"},
         "spec.source", OCI),
    Case("source-oci-uppercase-path", {"source": "oci://registry.example.com/Llama:v1"},
         "spec.source", OCI),
    Case("source-host-relative", {"source": "host://models/llama"}, "spec.source", HOST),
    Case("source-host-dotdot", {"source": "host:///models/../etc"}, "spec.source", HOST),
    Case("source-file-empty", {"source": "file://"}, "spec.source", FILE),
    Case("source-secret-not-hf", {"source": "pvc://models", "sourceSecret": "hub"},
         "spec.sourceSecret", "sourceSecret holds a hub token (HF_TOKEN): it is for hf:// "
         "sources only"),
    Case("source-secret-bad-name", {"source": "hf://a/b", "sourceSecret": "Hub_Token"},
         "spec.sourceSecret", "String should match pattern", server="should match"),
]

VALID: list[Case] = [
    Case("longest-name", {}, "", "", name=LONGEST_NAME),
    Case("phi-3-mini-head-dim-96", {"architecture": PHI3_ARCH, "sla": {
        "contextTokens": 4096, "concurrentSequences": 8}}, "", ""),
    Case("bytes-at-1pi", {"weights": {"bytes": "1Pi"}}, "", ""),
    Case("bytes-int-at-1pi", {"weights": {"bytes": 2**50}}, "", ""),
    Case("bytes-decimal-exponent", {"weights": {"bytes": "1.6e10"}}, "", ""),
    Case("bytes-longest", {"runtimeOverhead": "0." + "0" * 19 + "1" + "E"}, "", ""),
    Case("overhead-zero", {"runtimeOverhead": 0}, "", ""),
    Case("tp-16-replicating-kv", {"tensorParallel": 16}, "", ""),
    Case("tp-2-qwen", {"architecture": QWEN_ARCH, "tensorParallel": 2}, "", ""),
    Case("worker-full", _worker(
        image="registry.example.com:5000/kvpilot/worker_x:0.1.0@sha256:" + "a" * 64,
        resources={"requests": {"cpu": "500m", "memory": "2Gi", "example.com/dev": 1,
                                "ephemeral-storage": "1e9"},
                   "limits": {"cpu": 2, "memory": "2Gi", "example.com/dev": "1"}},
        engineArgs=["--max-batch", "16", "a b\tc"]), "", ""),
    Case("extended-limit-only", _res(limits={"example.com/dev": 2}), "", ""),
    Case("everything-at-its-maximum", {
        "weights": {"bytes": "1Pi"}, "runtimeOverhead": 2**50,
        "architecture": {"layers": 1024, "attentionHeads": 1024, "kvHeads": 1024,
                         "headDim": 1024, "maxContextTokens": 16_777_216},
        "sla": {"contextTokens": 16_777_216, "concurrentSequences": 65_536,
                "ttftMilliseconds": 3_600_000, "interTokenLatencyMilliseconds": 60_000},
        "maxReplicas": 10_000, "tensorParallel": 16}, "", ""),
    Case("gpu-products-label-values", {"gpuProducts": ["NVIDIA-H100-80GB-HBM3", "A_1.b"]},
         "", ""),
    *[Case(f"attention-{name}".replace(".", "-"), {"architecture": a}, "", "")
      for name, a in sorted(ATTENTION_ARCH.items())],
    Case("window-as-long-as-max-context",
         {"architecture": {**ARCH, "slidingWindow": {"tokens": 8192}}}, "", ""),
    Case("window-pattern-as-long-as-layers",
         {"architecture": {**ARCH, "slidingWindow": {"tokens": 1, "localLayers": 31,
                                                     "globalLayers": 1}}}, "", ""),
    *[Case(f"source-{i}", {"source": src}, "", "") for i, src in enumerate((
        "hf://meta-llama/Llama-3.1-8B-Instruct", "hf://Qwen/Qwen2.5-0.5B-Instruct@main",
        "hf://google/gemma-2-9b-it@" + "0" * 40, "pvc://models", "pvc://models.v1/a/b.c",
        "oci://registry.example.com:5000/models/llama-3-8b:v1@sha256:" + "a" * 64,
        "oci://llama", "host:///var/lib/models/llama", "file:///weights"))],
    Case("source-secret", {"source": "hf://meta-llama/Llama-3.1-8B", "sourceSecret": "hub"},
         "", ""),
    *[Case(f"spread-{s}", {"placement": {"spread": s}}, "", "") for s in ("gpu", "node", "none")],
    Case("placement-empty", {"placement": {}}, "", ""),
    Case("mla-with-window", {"architecture": {
        **ARCH, **MLA, "kvHeads": 32, "headDim": 192,
        "slidingWindow": {"tokens": 4096, "localLayers": 1, "globalLayers": 1}}}, "", ""),
]


def apply_overrides(spec: dict, overrides: dict) -> dict:
    spec = {**spec, **overrides}
    return {k: v for k, v in spec.items() if v is not None}


def document(case: Case, spec: dict, name: Optional[str] = None) -> dict[str, Any]:
    """The whole Model document of ``case`` on top of ``spec``."""
    return {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": case.name if case.name is not None else (name or case.id)},
        "spec": apply_overrides(spec, case.spec),
        **case.extra,
    }
