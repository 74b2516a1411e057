"""The operator's own metrics, served on its ``/metrics`` (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
LABELS = ("namespace", "model")

DESIRED = Gauge("kvpilot_operator_model_desired_replicas",
                "Replicas the Model asks for (spec.replicas within its bounds).", LABELS,
                registry=REGISTRY)
ACTUAL = Gauge("kvpilot_operator_model_replicas",
               "Worker pods of the Model that exist and are not draining.", LABELS,
               registry=REGISTRY)
READY = Gauge("kvpilot_operator_model_ready_replicas", "Worker pods of the Model that are "
              "Ready.", LABELS, registry=REGISTRY)
UNPLACED = Gauge("kvpilot_operator_model_unplaced_replicas",
                 "Desired replicas that placement could not fit anywhere.", LABELS,
                 registry=REGISTRY)
KV_PRESSURE = Gauge("kvpilot_operator_model_kv_pressure_ratio",
                    "KV in use over KV capacity across the Model's answering workers (0-1).",
                    LABELS, registry=REGISTRY)
SCRAPE_FAILURES = Counter("kvpilot_operator_scrape_failures",
                          "Worker /metrics scrapes that failed.", LABELS, registry=REGISTRY)
SCALINGS = Counter("kvpilot_operator_scaling_decisions",
                   "Replica changes the autoscaler made.", (*LABELS, "direction", "cause"),
                   registry=REGISTRY)
PLACEMENT_FAILURES = Counter("kvpilot_operator_placement_failures",
                             "Fleet passes that left at least one replica of the Model "
                             "unplaced.", LABELS, registry=REGISTRY)
RECONCILE_SECONDS = Histogram("kvpilot_operator_reconcile_duration_seconds",
                              "Time of one fleet pass (snapshot, place, writes).",
                              registry=REGISTRY,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
SCRAPE_SECONDS = Histogram("kvpilot_operator_scrape_round_seconds",
                           "Time of one scrape round over every worker.", registry=REGISTRY,
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
API_WRITES = Counter("kvpilot_operator_api_writes", "Write requests sent to the API server.",
                     registry=REGISTRY)
# The Model's targets, so a dashboard draws what it measures against what it should be.
KV_TARGET = Gauge("kvpilot_operator_model_kv_pressure_target_ratio",
                  "The Model's autoscaling.targetKvPressurePercent, as a ratio (0-1).", LABELS,
                  registry=REGISTRY)
TTFT_TARGET = Gauge("kvpilot_operator_model_ttft_target_seconds",
                    "The Model's sla.ttftMilliseconds, in seconds.", LABELS, registry=REGISTRY)
ITL_TARGET = Gauge("kvpilot_operator_model_itl_target_seconds",
                   "The Model's sla.interTokenLatencyMilliseconds, in seconds.", LABELS,
                   registry=REGISTRY)
NODE_GPU_MEMORY = Gauge("kvpilot_operator_node_gpu_memory_bytes",
                        "HBM of all the node's GPUs, as the fleet snapshot saw them.",
                        ("node",), registry=REGISTRY)
NODE_GPU_MEMORY_ALLOCATED = Gauge(
    "kvpilot_operator_node_gpu_memory_allocated_bytes", "HBM the node's replicas hold "
    "(their per-GPU budgets times their GPUs; starting, serving and draining).", ("node",),
    registry=REGISTRY)


def serve(port: int) -> None:
    """Serve /metrics on ``port`` in a thread (0: not at all)."""
    if port:
        start_http_server(port, registry=REGISTRY)


def node_memory(nodes, replicas) -> dict[str, tuple[int, int]]:
    """Node name -> (HBM of its GPUs, HBM its replicas hold), from a placement
    snapshot's nodes and replicas (``Node``, ``Existing``): what a dashboard's "GPU
    memory allocated per node" draws."""
    out = {n.name: (n.gpus * n.gpu_hbm, 0) for n in nodes}
    for e in replicas:
        total, held = out.get(e.node, (0, 0))
        out[e.node] = (total, held + e.hbm_per_gpu * len(e.gpus))
    return out


_NODES: set[str] = set()  # nodes with series, so a node that goes takes its own along


def observe_nodes(nodes, replicas) -> None:
    """Set the per-node GPU memory gauges; a node gone from the snapshot is dropped."""
    now = node_memory(nodes, replicas)
    for node in _NODES - set(now):
        NODE_GPU_MEMORY.remove(node)
        NODE_GPU_MEMORY_ALLOCATED.remove(node)
    _NODES.clear()
    _NODES.update(now)
    for node, (total, held) in now.items():
        NODE_GPU_MEMORY.labels(node).set(total)
        NODE_GPU_MEMORY_ALLOCATED.labels(node).set(held)


def observe_targets(namespace: str, model: str, spec) -> None:
    """Set a Model's target gauges from its ``ModelSpec`` (a target it does not set: no
    series)."""
    KV_TARGET.labels(namespace, model).set(spec.autoscaling.target_kv_pressure_percent / 100)
    for gauge, ms in ((TTFT_TARGET, spec.sla.ttft_milliseconds),
                      (ITL_TARGET, spec.sla.inter_token_latency_milliseconds)):
        if ms is None:
            try:
                gauge.remove(namespace, model)
            except KeyError:
                pass
        else:
            gauge.labels(namespace, model).set(ms / 1000)


def forget(namespace: str, model: str) -> None:
    """Drop a deleted Model's series."""
    for g in (DESIRED, ACTUAL, READY, UNPLACED, KV_PRESSURE, KV_TARGET, TTFT_TARGET,
              ITL_TARGET):
        try:
            g.remove(namespace, model)
        except KeyError:
            pass
