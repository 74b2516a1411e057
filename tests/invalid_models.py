"""Invalid Model specs shared by the pydantic tests and the API-server (CEL) tests.

Each case: (id, spec overrides on top of ``llama_spec()``, what pydantic says, what the
API server says). Both must refuse every case, naming the field and the fix.
"""

from __future__ import annotations

ARCH = {"layers": 32, "attentionHeads": 32, "kvHeads": 8, "headDim": 128,
        "maxContextTokens": 8192}

INVALID = [
    ("min-gt-max", {"minReplicas": 3, "maxReplicas": 2, "replicas": 2},
     "minReplicas must be <= maxReplicas", "minReplicas must be <= maxReplicas"),
    ("below-min", {"replicas": 0},
     "replicas must be >= minReplicas", "replicas must be >= minReplicas"),
    ("above-max", {"replicas": 5, "maxReplicas": 4},
     "replicas must be <= maxReplicas", "replicas must be <= maxReplicas"),
    ("context-too-long", {"sla": {"contextTokens": 9000, "concurrentSequences": 1}},
     "sla.contextTokens must be <= architecture.maxContextTokens",
     "sla.contextTokens must be <= architecture.maxContextTokens"),
    ("tp-not-divisor", {"tensorParallel": 3},
     "tensorParallel must divide architecture.kvHeads",
     "tensorParallel must divide architecture.kvHeads"),
    ("tp-bad-string", {"tensorParallel": "two"},
     "tensorParallel", "tensorParallel must be 'auto' or an integer from 1 to 16"),
    ("tp-too-large", {"tensorParallel": 32},
     "tensorParallel", "tensorParallel must be 'auto' or an integer from 1 to 16"),
    ("autoscaling-no-max", {"autoscaling": {"enabled": True}},
     "autoscaling.enabled needs maxReplicas", "autoscaling.enabled needs maxReplicas"),
    ("weights-empty", {"weights": {"dtype": "bf16"}},
     "weights needs parameters", "weights needs parameters"),
    ("weights-bad-bytes", {"weights": {"bytes": "16 gigs"}},
     "weights.bytes", "must be a byte count"),
    ("kv-dtype", {"kvCacheDtype": "int3"},
     "kvCacheDtype", 'spec.kvCacheDtype: Unsupported value: "int3"'),
    ("kv-heads-not-divisor", {"architecture": {**ARCH, "kvHeads": 6}},
     "kvHeads must divide attentionHeads", "kvHeads must divide attentionHeads"),
    ("kv-heads-zero", {"architecture": {**ARCH, "kvHeads": 0}},
     "architecture.kvHeads", "spec.architecture.kvHeads: Invalid value: 0"),
    ("overhead-negative", {"runtimeOverhead": "-1Gi"},
     "runtimeOverhead", "must be a byte count"),
    ("missing-sla", {"sla": None},
     "sla", 'spec.sla: Required value'),
    ("zero-sequences", {"sla": {"contextTokens": 1024, "concurrentSequences": 0}},
     "sla.concurrentSequences", "spec.sla.concurrentSequences: Invalid value: 0"),
]


def apply_overrides(spec: dict, overrides: dict) -> dict:
    spec = {**spec, **overrides}
    return {k: v for k, v in spec.items() if v is not None}
