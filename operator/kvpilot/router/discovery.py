"""Follows the EndpointSlices of kvpilot's Model Services: list, then watch from that
list's resourceVersion (with bookmarks), relisting when the watch's history is gone
(410) or the API server could not be reached.

It needs exactly ``list`` and ``watch`` on ``endpointslices`` (discovery.k8s.io), in
every namespace or in the ones it is given; the chart's router ClusterRole (or Roles)
grants that and nothing else. Changes are published as a new ``Routes`` (built by the
pure ``routes_from``) at most every ``coalesce`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Iterable

import httpx

from kvpilot.operator.kube import Credentials
from kvpilot.router.endpoints import SLICE_SELECTOR, Routes, routes_from

log = logging.getLogger("kvpilot.router")
USER_AGENT = "kvpilot-router"
GROUP = "/apis/discovery.k8s.io/v1"
WATCH_SECONDS = 290  # the API server ends a watch after this; the router watches on
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


def slices_path(namespace: str) -> str:
    return f"{GROUP}/namespaces/{namespace}/endpointslices" if namespace else \
        f"{GROUP}/endpointslices"


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class SliceWatch:
    """The slices of one list/watch per namespace ("" for all), as ``Routes``."""

    def __init__(self, creds: Credentials, namespaces: Iterable[str],
                 publish: Callable[[Routes], None], coalesce: float = 0.02,
                 timeout: float = 10.0) -> None:
        self.creds = creds
        self.namespaces = tuple(namespaces) or ("",)
        self.publish = publish
        self.coalesce = coalesce
        self.client = httpx.AsyncClient(
            base_url=creds.server, verify=creds.ssl_context, headers={"User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout, read=WATCH_SECONDS + 30),
            limits=httpx.Limits(max_connections=2 * len(self.namespaces) + 2))
        self._slices: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            ns: {} for ns in self.namespaces}
        self._listed: set[str] = set()
        self._pending: asyncio.TimerHandle | None = None

    @property
    def synced(self) -> bool:
        """Every namespace listed at least once."""
        return len(self._listed) == len(self.namespaces)

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._follow(ns) for ns in self.namespaces))
        finally:
            await self.client.aclose()

    def _changed(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.coalesce, self._flush)

    def _flush(self) -> None:
        self._pending = None
        self.publish(routes_from(s for slices in self._slices.values()
                                 for s in slices.values()))

    async def _follow(self, namespace: str) -> None:
        failures = 0
        while True:
            try:
                version = await self._list(namespace)
                failures = 0
                while True:
                    version = await self._watch(namespace, version)
            except Gone:
                log.info("endpointslices%s: watch history gone, listing again",
                         f" in {namespace}" if namespace else "")
            except (httpx.HTTPError, ValueError) as err:
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                if failures == 0 or failures % 10 == 0:
                    log.warning("endpointslices%s: %s; retrying in %gs",
                                f" in {namespace}" if namespace else "", _why(err), delay)
                failures += 1
                await asyncio.sleep(delay)

    async def _list(self, namespace: str) -> str:
        resp = await self.client.get(slices_path(namespace), headers=self.creds.headers(),
                                     params={"labelSelector": SLICE_SELECTOR})
        resp.raise_for_status()
        body = resp.json()
        self._slices[namespace] = {_key(s): s for s in body.get("items") or []}
        if namespace not in self._listed:
            self._listed.add(namespace)
            log.info("endpointslices%s: %d listed", f" in {namespace}" if namespace else "",
                     len(self._slices[namespace]))
        self._changed()
        return body["metadata"]["resourceVersion"]

    async def _watch(self, namespace: str, version: str) -> str:
        params = {"labelSelector": SLICE_SELECTOR, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
        async with self.client.stream("GET", slices_path(namespace), params=params,
                                      headers=self.creds.headers()) as resp:
            if resp.status_code == 410:
                raise Gone()
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ValueError(f"watch error: {obj.get('message', obj)}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind in ("ADDED", "MODIFIED"):
                    self._slices[namespace][_key(obj)] = obj
                    self._changed()
                elif kind == "DELETED":
                    self._slices[namespace].pop(_key(obj), None)
                    self._changed()
        return version


def _key(s: dict[str, Any]) -> tuple[str, str]:
    meta = s.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _why(err: Exception) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        try:
            message = err.response.json().get("message", "")
        except ValueError:
            message = err.response.text[:200]
        return f"HTTP {err.response.status_code}: {message}"
    return f"{type(err).__name__}: {err}"
