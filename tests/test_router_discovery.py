"""The EndpointSlice watch against a fake API server (real HTTP on loopback): list, watch
from the list's resourceVersion, relist after a 410 or a failure, publish routes."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qsl
from dataclasses import dataclass, field

import pytest

from kvpilot.operator.kube import Credentials
from kvpilot.router.discovery import SliceWatch
from kvpilot.router.endpoints import SLICE_SELECTOR, Routes
from tests.router_helpers import Loop, ep, slice_of
from tests.router_helpers import serve as _serve


class Token:
    """Stands in for kubernetes.client.Configuration: a bearer token."""

    refresh_api_key_hook = None

    def get_api_key_with_prefix(self, name: str) -> str | None:
        return "Bearer t0ken" if name == "BearerToken" else None


@dataclass
class FakeApi:
    """list returns ``items`` at ``version``; a watch streams what ``events`` gets."""

    items: list[dict] = field(default_factory=list)
    version: int = 10
    events: asyncio.Queue | None = None
    calls: list[tuple[str, dict]] = field(default_factory=list)
    fail_next_list: int = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        query = dict(parse_qsl(scope["query_string"].decode()))
        headers = dict(scope["headers"])
        self.calls.append((scope["path"], query))
        assert headers[b"authorization"] == b"Bearer t0ken"
        if query.get("watch") != "1":
            if self.fail_next_list:
                self.fail_next_list -= 1
                return await self._json(send, 500, {"message": "etcd is sad"})
            return await self._json(send, 200, {"kind": "EndpointSliceList", "items": self.items,
                                                "metadata": {"resourceVersion": str(self.version)}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        while True:
            event = await self.events.get()
            if event is None:  # end this watch (as timeoutSeconds would)
                break
            await send({"type": "http.response.body", "body": json.dumps(event).encode() + b"\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _json(self, send, status, obj) -> None:
        body = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.stop()


def until(what: str, check, timeout: float = 5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pods(routes: Routes, model: str) -> list[str]:
    route = routes.models.get(model)
    return [e.pod for e in route.endpoints] if route else []


def with_version(obj: dict, version: int) -> dict:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(version)}}


def test_the_watch_lists_follows_changes_and_relists_when_history_is_gone(loop):
    api = FakeApi(items=[slice_of("m", [ep("198.18.0.1", "m-0")])])
    published: list[Routes] = []

    async def start():
        api.events = asyncio.Queue()
        server, task, port = await _serve(api)
        creds = Credentials(f"http://127.0.0.1:{port}", False, Token())
        watch = SliceWatch(creds, [], published.append, coalesce=0.01)
        return server, task, watch, asyncio.get_running_loop().create_task(watch.run())

    server, task, watch, running = loop.run(start())
    try:
        until("the first routes", lambda: published and watch.synced)
        assert pods(published[-1], "m") == ["m-0"]
        path, query = api.calls[0]
        assert path == "/apis/discovery.k8s.io/v1/endpointslices"
        assert query["labelSelector"] == SLICE_SELECTOR
        until("the watch", lambda: len(api.calls) == 2)
        assert api.calls[1][1]["resourceVersion"] == "10"
        assert api.calls[1][1]["allowWatchBookmarks"] == "true"

        two = slice_of("m", [ep("198.18.0.1", "m-0"), ep("198.18.0.2", "m-1")])
        loop.call(api.events.put_nowait, {"type": "MODIFIED", "object": with_version(two, 11)})
        until("m-1 routed", lambda: pods(published[-1], "m") == ["m-0", "m-1"])
        other = slice_of("n", [ep("198.18.1.1", "n-0")], namespace="team")
        loop.call(api.events.put_nowait, {"type": "ADDED", "object": with_version(other, 12)})
        until("n routed", lambda: pods(published[-1], "n") == ["n-0"])
        loop.call(api.events.put_nowait, {"type": "BOOKMARK", "object": {
            "metadata": {"resourceVersion": "15"}}})
        loop.call(api.events.put_nowait, {"type": "DELETED", "object": with_version(two, 16)})
        until("m gone", lambda: "m" not in published[-1].models)

        # The watch ends: the next one goes on from the last version seen (a bookmark's).
        loop.call(api.events.put_nowait, None)
        until("a second watch", lambda: len(api.calls) == 3)
        assert api.calls[2][1]["resourceVersion"] == "16"

        # History gone: list again, and the list is the truth (n's slice went meanwhile).
        api.items, api.version, api.fail_next_list = [two], 40, 1
        loop.call(api.events.put_nowait, {"type": "ERROR", "object": {
            "kind": "Status", "code": 410, "message": "too old resource version"}})
        until("the relist after a failed list",
              lambda: pods(published[-1], "m") == ["m-0", "m-1"] and
              "n" not in published[-1].models, timeout=8)
        lists = [q for _, q in api.calls if q.get("watch") != "1"]
        assert len(lists) == 3  # the first, the failed one, the one that worked
        until("the watch from the new list", lambda: api.calls[-1][1].get(
            "resourceVersion") == "40")
    finally:
        running.cancel()

        async def down():
            server.should_exit = True
            for _ in range(4):  # every watch handler still open ends
                api.events.put_nowait(None)
            await asyncio.gather(task, return_exceptions=True)

        loop.run(down())


def test_namespaced_watches_use_the_namespaced_path_and_sync_when_all_listed(loop):
    api = FakeApi(items=[])

    async def start():
        api.events = asyncio.Queue()
        server, task, port = await _serve(api)
        creds = Credentials(f"http://127.0.0.1:{port}", False, Token())
        watch = SliceWatch(creds, ["team-a", "team-b"], lambda r: None)
        return server, task, watch, asyncio.get_running_loop().create_task(watch.run())

    server, task, watch, running = loop.run(start())
    try:
        until("both listed", lambda: watch.synced)
        paths = {p for p, _ in api.calls}
        assert {"/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices",
                "/apis/discovery.k8s.io/v1/namespaces/team-b/endpointslices"} <= paths
    finally:
        running.cancel()

        async def down():
            server.should_exit = True
            for _ in range(4):
                api.events.put_nowait(None)
            await asyncio.gather(task, return_exceptions=True)

        loop.run(down())
