"""Prometheus export of ``EngineStats``: names from ``kvpilot.api.contract``, units in the
names, every kvpilot metric labelled with the model, and the vLLM-compatible gauges
(labelled ``model_name``) so existing dashboards and gateways read kvpilot workers.

A collector, not live metric objects: each scrape exports one consistent snapshot of the
engine's stats, and the engine never calls into prometheus-client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kvpilot.api import contract as c
from kvpilot.worker.stats import EngineStats, Histogram


class StatsCollector:
    def __init__(self, snapshot: Callable[[], EngineStats]):
        self._snapshot = snapshot

    def describe(self):
        return []  # no names registered up front: collect() is cheap and always fresh

    def collect(self) -> Iterator:
        s = self._snapshot()
        labels = [c.LABEL_MODEL]
        value = [s.model]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(value, v)
            return m

        def histogram(name, doc, h: Histogram):
            m = HistogramMetricFamily(name, doc, labels=labels)
            buckets = [("+Inf" if b == float("inf") else repr(float(b)), n)
                       for b, n in h.cumulative()]
            m.add_metric(value, buckets, h.total)
            return m

        yield gauge(c.KV_USAGE_RATIO, "KV pages held by sequences / all KV pages (0..1).",
                    s.usage_ratio)
        yield gauge(c.KV_CAPACITY_BYTES, "Bytes of the KV page pool.", s.capacity_bytes)
        yield gauge(c.KV_USED_BYTES, "Bytes of KV pages held by sequences.", s.used_bytes)
        yield gauge(c.KV_CAPACITY_TOKENS, "Tokens the KV page pool holds.", s.capacity_tokens)
        yield gauge(c.KV_USED_TOKENS, "Token slots in KV pages held by sequences.",
                    s.used_tokens)
        yield gauge(c.KV_BUDGET_BYTES, "KV bytes placement reserved per GPU for this "
                    "replica (the memory model); 0 when started without a budget.",
                    s.kv_budget_bytes)
        yield gauge(c.PAGES_TOTAL, "KV pages in the pool.", s.pages_total)
        yield gauge(c.PAGES_USED, "KV pages held by sequences.", s.pages_used)
        yield gauge(c.PAGES_CACHED, "Free KV pages still holding a reusable prefix.",
                    s.pages_cached)
        yield gauge(c.REQUESTS_RUNNING, "Sequences in the running batch.", s.running)
        yield gauge(c.REQUESTS_WAITING, "Sequences waiting for pages or a batch slot.",
                    s.waiting)
        yield counter(c.PREEMPTIONS, "Sequences preempted (pages freed, to be recomputed).",
                      s.preemptions)
        yield counter(c.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.",
                      s.prefix_queried_tokens)
        yield counter(c.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.",
                      s.prefix_hit_tokens)
        yield counter(c.GENERATION_TOKENS, "Tokens generated.", s.generation_tokens)
        yield counter(c.PROMPT_TOKENS, "Prompt tokens received.", s.prompt_tokens)
        yield histogram(c.TTFT_SECONDS, "Seconds from arrival to the first token.", s.ttft)
        yield histogram(c.ITL_SECONDS, "Seconds between tokens of a sequence.", s.itl)
        yield histogram(c.DECODE_STEP_SECONDS, "Seconds per decode step (forward pass and "
                        "sampling).", s.decode_step)
        yield gauge(c.DECODE_STEP_BYTES, "Weight and KV bytes the last decode step read "
                    "(over the step time: the achieved memory bandwidth).", s.step_read_bytes)
        yield gauge(c.DRAINING, "1 while the worker drains, else 0.", 1 if s.draining else 0)

        vllm = [c.VLLM_LABEL_MODEL]
        for name, doc, v in (
            (c.VLLM_KV_USAGE, "KV-cache usage, 0..1 (vLLM-compatible).", s.usage_ratio),
            (c.VLLM_REQUESTS_WAITING, "Requests waiting (vLLM-compatible).", s.waiting),
            (c.VLLM_REQUESTS_RUNNING, "Requests running (vLLM-compatible).", s.running),
        ):
            g = GaugeMetricFamily(name, doc, labels=vllm)
            g.add_metric(value, v)
            yield g


def registry_for(snapshot: Callable[[], EngineStats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
