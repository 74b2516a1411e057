"""The workers' load, as their ``/metrics`` say it, read every few hundred ms.

``parse_load`` is pure and reads only three gauges (KV usage, running, waiting) with one
regular-expression pass: the router scrapes every replica several times a second, so a
full Prometheus parse of histograms it does not use would cost more than the routing.
``LoadBoard`` keeps the router's open requests per replica (exact) beside the last
scrape of each (stale after ``stale_after`` seconds: then only the open count is known),
and ``scrape_forever`` refreshes it, at most ``max_rate`` scrapes a second in all so a
large fleet stretches the interval instead of the router's CPU.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import httpx

from kvpilot.api import contract
from kvpilot.router.scoring import Load

_GAUGES = (contract.KV_USAGE_RATIO, contract.REQUESTS_RUNNING, contract.REQUESTS_WAITING)
_LINE = re.compile(r"^(" + "|".join(map(re.escape, _GAUGES)) + r")\{([^}\n]*)\} (\S+)",
                   re.MULTILINE)


@dataclass(frozen=True)
class WorkerLoad:
    kv_usage: float
    running: int
    waiting: int


def parse_load(text: str, model: str) -> WorkerLoad | None:
    """The load gauges of ``model`` in a worker's Prometheus text; None when it exports
    no KV usage for that model (not a kvpilot worker of it, or not loaded yet)."""
    label = f'{contract.LABEL_MODEL}="{model}"'
    values: dict[str, float] = {}
    for m in _LINE.finditer(text):
        if label not in m.group(2).split(","):
            continue
        try:
            values[m.group(1)] = float(m.group(3))
        except ValueError:
            return None
    if contract.KV_USAGE_RATIO not in values:
        return None
    usage = values[contract.KV_USAGE_RATIO]
    return WorkerLoad(kv_usage=min(max(usage, 0.0), 1.0) if usage == usage else 0.0,
                      running=int(values.get(contract.REQUESTS_RUNNING, 0)),
                      waiting=int(values.get(contract.REQUESTS_WAITING, 0)))


class LoadBoard:
    """Open requests and scraped loads per replica (by endpoint name)."""

    def __init__(self, stale_after: float, clock: Callable[[], float] = time.monotonic):
        self.stale_after = stale_after
        self.clock = clock
        self.open: dict[str, int] = {}
        self._scraped: dict[str, tuple[WorkerLoad, float]] = {}

    def opened(self, name: str) -> None:
        self.open[name] = self.open.get(name, 0) + 1

    def closed(self, name: str) -> None:
        left = self.open.get(name, 0) - 1
        if left > 0:
            self.open[name] = left
        else:
            self.open.pop(name, None)

    def scraped(self, name: str, load: WorkerLoad | None) -> None:
        if load is None:
            self._scraped.pop(name, None)
        else:
            self._scraped[name] = (load, self.clock())

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget scrapes of replicas that are gone (open counts go as requests end)."""
        keep = set(names)
        for name in [n for n in self._scraped if n not in keep]:
            del self._scraped[name]

    def loads(self, names: Iterable[str]) -> dict[str, Load]:
        now = self.clock()
        out = {}
        for name in names:
            seen = self._scraped.get(name)
            opened = self.open.get(name, 0)
            if seen is None or now - seen[1] > self.stale_after:
                out[name] = Load(open=opened)
            else:
                w = seen[0]
                out[name] = Load(open=opened, running=w.running, waiting=w.waiting,
                                 kv_usage=w.kv_usage)
        return out


async def scrape_forever(client: httpx.AsyncClient, board: LoadBoard,
                         targets: Callable[[], Mapping[str, tuple[str, str]]],
                         interval: float, timeout: float, max_rate: float = 200.0,
                         concurrency: int = 32) -> None:
    """Scrape every target (endpoint name -> (url, model)) each ``interval`` seconds, or
    each ``len(targets) / max_rate`` seconds when that is longer."""
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str, url: str, model: str) -> None:
        async with gate:
            try:
                resp = await client.get(url + contract.PATH_METRICS, timeout=timeout)
                load = parse_load(resp.text, model) if resp.status_code == 200 else None
            except httpx.HTTPError:
                load = None
        board.scraped(name, load)

    while True:
        started = time.monotonic()
        now = dict(targets())
        board.keep_only(now)
        if now:
            await asyncio.gather(*(one(n, url, model) for n, (url, model) in now.items()))
        period = max(interval, len(now) / max_rate)
        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
