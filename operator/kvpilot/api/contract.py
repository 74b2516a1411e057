"""The wire contract between the operator and its workers: metric names, endpoints, env.

The worker exports these metrics and serves these endpoints; the operator scrapes and
calls them. Both sides import the names from here, so a rename breaks tests on both
sides at once instead of silently breaking autoscaling.

Every kvpilot metric carries the label ``model`` (the Model's name). Units are in the
names (``_bytes``, ``_tokens``, ``_seconds``), as Prometheus recommends.
"""

from __future__ import annotations

# --- worker metrics (kvpilot's own) ------------------------------------------------------
LABEL_MODEL = "model"

KV_USAGE_RATIO = "kvpilot_kv_cache_usage_ratio"  # used pages / total pages, 0..1
KV_CAPACITY_BYTES = "kvpilot_kv_cache_capacity_bytes"  # bytes of the page pool
KV_USED_BYTES = "kvpilot_kv_cache_used_bytes"  # bytes held by running sequences
KV_CAPACITY_TOKENS = "kvpilot_kv_cache_capacity_tokens"
KV_USED_TOKENS = "kvpilot_kv_cache_used_tokens"
KV_BUDGET_BYTES = "kvpilot_kv_cache_budget_bytes"  # what placement reserved for KV
PAGES_TOTAL = "kvpilot_kv_pages_total"
PAGES_USED = "kvpilot_kv_pages_used"
PAGES_CACHED = "kvpilot_kv_pages_cached"  # free but holding a reusable prefix
REQUESTS_RUNNING = "kvpilot_requests_running"
REQUESTS_WAITING = "kvpilot_requests_waiting"
PREEMPTIONS = "kvpilot_preemptions"  # counter (exported with the _total suffix)
PREFIX_CACHE_QUERIES = "kvpilot_prefix_cache_queried_tokens"  # counter
PREFIX_CACHE_HITS = "kvpilot_prefix_cache_hit_tokens"  # counter
GENERATION_TOKENS = "kvpilot_generation_tokens"  # counter
PROMPT_TOKENS = "kvpilot_prompt_tokens"  # counter
TTFT_SECONDS = "kvpilot_time_to_first_token_seconds"  # histogram
ITL_SECONDS = "kvpilot_inter_token_latency_seconds"  # histogram
DECODE_STEP_SECONDS = "kvpilot_decode_step_seconds"  # histogram
DECODE_STEP_BYTES = "kvpilot_decode_step_read_bytes"  # gauge: weights + KV read last step
DRAINING = "kvpilot_draining"  # 1 while the worker drains, else 0

# --- vLLM-compatible gauges, so existing dashboards and gateways read kvpilot workers ----
VLLM_LABEL_MODEL = "model_name"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"  # 0..1, despite the name
VLLM_REQUESTS_WAITING = "vllm:num_requests_waiting"
VLLM_REQUESTS_RUNNING = "vllm:num_requests_running"

# --- endpoints ---------------------------------------------------------------------------
WORKER_PORT = 8000
PATH_METRICS = "/metrics"
PATH_HEALTH = "/health"  # liveness: the process serves HTTP
PATH_READY = "/ready"  # readiness: the model is loaded and the worker admits requests
# POST starts draining (idempotent); GET reports progress. Both answer DrainStatus JSON:
#   {"draining": bool, "drained": bool, "running": int, "waiting": int}
# ``drained`` is true once draining and nothing runs or waits. A draining worker answers
# new requests with 503 and /ready with 503, so endpoints stop sending it traffic.
PATH_DRAIN = "/drain"

# --- how the operator hands a worker its Model -------------------------------------------
# The Model's spec as JSON (camelCase, as stored in the API server).
ENV_MODEL_SPEC = "KVPILOT_MODEL_SPEC"
ENV_MODEL_NAME = "KVPILOT_MODEL_NAME"
# The HBM budget placement reserved per GPU and the resolved TP degree.
ENV_HBM_PER_GPU = "KVPILOT_HBM_PER_GPU_BYTES"
ENV_TENSOR_PARALLEL = "KVPILOT_TENSOR_PARALLEL"

# --- why a worker or its weights fetch stopped ------------------------------------------
# A worker container (or the init container that fetches weights) that cannot go on
# writes one line, "<Reason>: <message>", to its termination message file before it
# exits non-zero; the kubelet puts it in the container's status and the operator turns
# it into the Model's Degraded condition and an Event with that reason. The path is the
# Kubernetes default; the env var moves it (for tests that run workers outside a pod).
ENV_TERMINATION_LOG = "KVPILOT_TERMINATION_LOG"
TERMINATION_LOG = "/dev/termination-log"
REASON_WEIGHTS_UNAVAILABLE = "WeightsUnavailable"  # the checkpoint could not be fetched or opened
REASON_WEIGHTS_MISMATCH = "WeightsMismatch"  # the checkpoint disagrees with the Model's facts
REASON_LOAD_FAILED = "LoadFailed"  # anything else that stopped the model from loading
# A rank of a tensor-parallel replica died or hung after the model loaded.
REASON_RANK_FAILED = "RankFailed"
