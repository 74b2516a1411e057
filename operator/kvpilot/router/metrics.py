"""The router's own Prometheus metrics, in a registry of its own (one per router, so
tests can run several in one process). Names carry their unit; ``model`` is a Model the
router knows (``-`` for requests refused before one was known)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REQUESTS = "kvpilot_router_requests"  # counter, by model and HTTP status
RETRIES = "kvpilot_router_retries"  # counter, by model and cause
PICKS = "kvpilot_router_picks"  # counter, by model and the scoring's reason
UPSTREAM_LATENCY = "kvpilot_router_upstream_latency_seconds"  # histogram, to response head
UPSTREAM_LOST = "kvpilot_router_upstream_lost"  # counter: responses cut by the upstream
CLIENT_GONE = "kvpilot_router_client_disconnects"  # counter: upstream requests aborted
OPEN = "kvpilot_router_open_requests"  # gauge: upstream requests open now
REPLICAS = "kvpilot_router_ready_replicas"  # gauge, by model
NO_MODEL = "-"
# Retry causes: the upstream said 429 or 503, could not be reached, or did not answer.
CAUSES = ("429", "503", "connect", "timeout")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self, open_requests: Callable[[], int],
                 replicas: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(REQUESTS, "Requests answered, by model and HTTP status.",
                                ["model", "code"], registry=r)
        self.retries = Counter(RETRIES, "Requests sent to another replica after one said "
                               "429 or 503, could not be reached, or did not answer in time.",
                               ["model", "cause"], registry=r)
        self.picks = Counter(PICKS, "Replica choices, by the scoring's reason.",
                             ["model", "reason"], registry=r)
        self.latency = Histogram(UPSTREAM_LATENCY, "Seconds from sending a request to a "
                                 "replica to its response head (for a stream: its first "
                                 "token).", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.lost = Counter(UPSTREAM_LOST, "Responses a replica cut short (gone or silent "
                            "mid-response); streams end with an error event.", ["model"],
                            registry=r)
        self.client_gone = Counter(CLIENT_GONE, "Requests whose client went away before the "
                                   "answer ended; their upstream request was aborted.",
                                   ["model"], registry=r)
        r.register(_Gauges(open_requests, replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges:
    def __init__(self, open_requests: Callable[[], int],
                 replicas: Callable[[], dict[str, int]]) -> None:
        self._open, self._replicas = open_requests, replicas

    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily(OPEN, "Requests open to replicas now.", value=self._open())
        g = GaugeMetricFamily(REPLICAS, "Ready, non-draining replicas of each Model (from "
                              "its Service's EndpointSlices).", labels=["model"])
        for model, n in sorted(self._replicas().items()):
            g.add_metric([model], n)
        yield g
