"""Reading workers: their ``/metrics`` (parsed with prometheus-client) and ``/drain``.

``parse_metrics`` is pure; ``scrape`` and ``drain`` do the HTTP, concurrently and with
short timeouts. A worker that does not answer gives ``None``, never zeros: silence is
not idleness (see ``autoscale``).

A worker cannot hold a scrape round: the timeout bounds a whole scrape (connect, head
and body together; httpx's own timeouts are per read, so a worker dripping a byte a
second would never meet them), a body beyond ``MAX_BODY_BYTES`` is cut off and counts as
no answer, and bodies are parsed on a thread, never on the event loop the operator's
watches run on. Anything the parser refuses is no answer too.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Iterable, Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.api import contract


@dataclass(frozen=True)
class WorkerMetrics:
    kv_used: int
    kv_capacity: int
    running: int
    waiting: int
    preemptions: int  # counter, since the worker started
    draining: bool
    # TTFT and ITL histograms since the worker started: (upper bound, cumulative count)
    ttft: tuple[tuple[float, float], ...] = ()
    itl: tuple[tuple[float, float], ...] = ()


def parse_metrics(text: str, model: str) -> WorkerMetrics:
    """The autoscaling signals of one worker, for ``model``, from Prometheus text."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {contract.TTFT_SECONDS + "_bucket": {},
                                              contract.ITL_SECONDS + "_bucket": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get(contract.LABEL_MODEL) != model:
                continue
            if s.name in buckets and "le" in s.labels:
                b = buckets[s.name]
                le = float(s.labels["le"])
                b[le] = b.get(le, 0.0) + s.value
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    missing = [n for n in (contract.KV_USED_BYTES, contract.KV_CAPACITY_BYTES)
               if n not in values]
    if missing:
        raise ValueError(f"worker exports no {', '.join(missing)} for model {model!r}")
    return WorkerMetrics(
        kv_used=int(values[contract.KV_USED_BYTES]),
        kv_capacity=int(values[contract.KV_CAPACITY_BYTES]),
        running=int(values.get(contract.REQUESTS_RUNNING, 0)),
        waiting=int(values.get(contract.REQUESTS_WAITING, 0)),
        preemptions=int(values.get(contract.PREEMPTIONS + "_total", 0)),
        draining=values.get(contract.DRAINING, 0) > 0,
        ttft=tuple(sorted(buckets[contract.TTFT_SECONDS + "_bucket"].items())),
        itl=tuple(sorted(buckets[contract.ITL_SECONDS + "_bucket"].items())),
    )


def worker_url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


# A worker's /metrics is a few KB (one Model's labels); a megabyte is no metrics page.
MAX_BODY_BYTES = 2**20


class BodyTooLarge(Exception):
    pass


async def read_body(client: httpx.AsyncClient, method: str, url: str, timeout: float,
                    limit: int = MAX_BODY_BYTES) -> str:
    """The body of ``method url``, all of it within ``timeout`` seconds and ``limit``
    bytes (TimeoutError, BodyTooLarge); a status other than 2xx is an httpx error."""
    async with asyncio.timeout(timeout):
        async with client.stream(method, url, timeout=timeout) as resp:
            resp.raise_for_status()
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(f"Content-Length {declared} > {limit} bytes")
            body = bytearray()
            async for chunk in resp.aiter_bytes():  # decoded: a gzip bomb is bounded too
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"body over {limit} bytes")
    return body.decode("utf-8", errors="replace")


async def scrape(client: httpx.AsyncClient, ip: str, port: int, model: str,
                 timeout: float) -> tuple[Optional[WorkerMetrics], str]:
    """(metrics, "") or (None, why it failed)."""
    url = worker_url(ip, port, contract.PATH_METRICS)
    try:
        text = await read_body(client, "GET", url, timeout)
    except TimeoutError:
        return None, f"no whole answer within {timeout:g}s"
    except (httpx.HTTPError, BodyTooLarge) as err:
        return None, f"{type(err).__name__}: {err}"
    try:
        return await asyncio.to_thread(parse_metrics, text, model), ""
    except Exception as err:  # noqa: BLE001 - whatever garbage makes the parser raise
        return None, f"{type(err).__name__}: {err}"


# Scrapes in flight at once. More only queue inside the HTTP client's connection pool,
# whose bookkeeping grows with the square of the queue (thousands of workers would hold
# the event loop for seconds).
CONCURRENCY = 64


async def scrape_all(client: httpx.AsyncClient, targets: Iterable[tuple[str, str, str]],
                     port: int, timeout: float) -> dict[str, tuple[Optional[WorkerMetrics], str]]:
    """Scrape (key, ip, model) targets, CONCURRENCY at a time; key -> (metrics, error)."""
    targets = list(targets)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(ip: str, model: str) -> tuple[Optional[WorkerMetrics], str]:
        async with gate:
            return await scrape(client, ip, port, model, timeout)

    results = await asyncio.gather(*(one(ip, model) for _, ip, model in targets))
    return {key: r for (key, _, _), r in zip(targets, results)}


async def drain(client: httpx.AsyncClient, ip: str, port: int, timeout: float
                ) -> Optional[bool]:
    """Ask a worker to drain (again: it is idempotent): drained? None: no answer."""
    url = worker_url(ip, port, contract.PATH_DRAIN)
    try:
        return bool(json.loads(await read_body(client, "POST", url, timeout)).get("drained"))
    except (TimeoutError, httpx.HTTPError, BodyTooLarge, ValueError, AttributeError):
        return None
