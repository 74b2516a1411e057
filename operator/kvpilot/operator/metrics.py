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


def serve(port: int) -> None:
    """Serve /metrics on ``port`` in a thread (0: not at all)."""
    if port:
        start_http_server(port, registry=REGISTRY)


def forget(namespace: str, model: str) -> None:
    """Drop a deleted Model's series."""
    for g in (DESIRED, ACTUAL, READY, UNPLACED, KV_PRESSURE):
        try:
            g.remove(namespace, model)
        except KeyError:
            pass
