"""The router's HTTP side against fake replicas: real HTTP on loopback, the router and
the fakes served by uvicorn on an event loop of their own, the test a plain client.

Each fake replica is a small ASGI app whose behaviour a test sets: answer, stream slowly,
say 429 or 503, hang, or go away mid-stream; it records what it was sent and whether its
client (the router) went away before it finished.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from kvpilot.router.app import RouteTable, Router, RouterSettings, upstream_client
from kvpilot.router.auth import ApiKeys
from kvpilot.router.endpoints import ModelRoute, Routes, endpoint
from kvpilot.router.loads import LoadBoard
from kvpilot.router.server import ServerBounds
from tests.router_helpers import Loop, serve as _serve

MODEL = "tiny"


def completion(text: str = "hello", model: str = MODEL) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "model": model,
                       "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]
                       }).encode()


def event(text: str, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text,
                                                "finish_reason": finish}]}).encode() + b"\n\n"


@dataclass
class Fake:
    """A fake replica. ``behaviour``: ok, stream, 429, 503, hang, die (mid-stream)."""

    name: str
    behaviour: str = "ok"
    events: int = 3
    delay: float = 0.0  # seconds between stream events
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    aborted: int = 0  # requests whose client went away before the answer ended
    finished: int = 0
    port: int = 0
    metrics: bytes = b""  # its /metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        if scope["path"] == "/metrics":
            return await self._plain(send, 200, self.metrics, b"text/plain")
        self.bodies.append(body)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        b = self.behaviour
        if b in ("429", "503"):
            return await self._plain(send, int(b), json.dumps({"error": {
                "message": f"{self.name} says {b}", "type": "x", "param": None,
                "code": "queue_full" if b == "429" else "draining"}}).encode(),
                b"application/json", [(b"retry-after", b"7")] if b == "429" else [])
        if b == "hang":
            gone = await self._disconnected(receive, 3600)
            self.aborted += gone
            return
        if b == "ok":
            if self.delay:
                if await self._disconnected(receive, self.delay):
                    self.aborted += 1
                    return
            await self._plain(send, 200, completion(self.name), b"application/json")
            self.finished += 1
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for i in range(self.events):
            if b == "die" and i == self.events - 1:
                await send({"type": "http.response.body", "body": b"data: {\"choi",
                            "more_body": True})
                return  # the response never completes: uvicorn cuts the connection
            await send({"type": "http.response.body", "body": event(f"{self.name}-{i}"),
                        "more_body": True})
            if self.delay and await self._disconnected(receive, self.delay):
                self.aborted += 1
                return
        await send({"type": "http.response.body", "body": event("", "stop") +
                    b"data: [DONE]\n\n", "more_body": False})
        self.finished += 1

    async def _disconnected(self, receive, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                while (await receive())["type"] != "http.disconnect":
                    pass
                return True
        except TimeoutError:
            return False

    async def _plain(self, send, status, body, ctype, extra=()) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
            *extra]})
        await send({"type": "http.response.body", "body": body})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class World:
    """Fake replicas, a router over them, and a client."""

    def __init__(self, loop: Loop, fakes: list[Fake], settings: RouterSettings,
                 keys: ApiKeys | None = None, bounds: ServerBounds | None = None) -> None:
        self.loop = loop
        self.fakes = {f.name: f for f in fakes}
        self.servers = []
        for f in fakes:
            server, task, f.port = loop.run(_serve(f))
            self.servers.append((server, task))
        self.table = RouteTable(self.routes([f.name for f in fakes]))
        self.board = LoadBoard(stale_after=5)

        async def make():
            client = upstream_client(settings)
            router = Router(settings, self.table, self.board, client, keys=keys)
            return client, router

        self.client, self.router = loop.run(make())
        server, task, self.port = loop.run(_serve(self.router, bounds or ServerBounds()))
        self.servers.append((server, task))
        self.url = f"http://127.0.0.1:{self.port}"

    def routes(self, names: list[str], model: str = MODEL) -> Routes:
        eps = tuple(sorted((endpoint("127.0.0.1", self.fakes[n].port, pod=n) for n in names),
                           key=lambda e: e.name))
        return Routes({model: ModelRoute(model, "default", eps)})

    def serve_only(self, *names: str) -> None:
        self.loop.call(self.table.publish, self.routes(list(names)))

    def post(self, body: Any, path: str = "/v1/completions", **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, timeout=kw.pop("timeout", 20),
                          headers={"content-type": "application/json", **kw.pop("headers", {})},
                          **kw)

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def close(self) -> None:
        async def down():
            for server, task in self.servers:
                server.should_exit = True
            await asyncio.gather(*(t for _, t in self.servers), return_exceptions=True)
            await self.client.close()

        self.loop.run(down())


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.stop()


FAST = RouterSettings(upstream_timeout=1.0, idle_timeout=1.0, connect_timeout=0.5,
                      body_timeout=1.0, send_timeout=2.0, max_body_bytes=64 * 1024)


@pytest.fixture
def world(loop, request):
    spec = getattr(request, "param", None) or {}
    fakes = [Fake(n, spec.get(n, "ok")) for n in ("a", "b", "c")]
    w = World(loop, fakes, spec.get("settings", FAST))
    yield w
    w.close()


def body(prompt: str = "x" * 300, stream: bool = False, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream, **extra}


# -- routing and passing through --------------------------------------------------------------

def test_a_completion_is_passed_through_byte_for_byte_to_one_replica(world):
    raw = b'{"model": "tiny",  "prompt": "\\u00e9t\\u00e9 ' + b"y" * 300 + b'", "max_tokens": 4}'
    r = world.post(raw, headers={"x-request-id": "abc", "authorization": "Bearer secret"})
    assert r.status_code == 200, r.text
    replica = r.headers["x-kvpilot-replica"]
    assert r.json()["choices"][0]["text"] == replica
    fake = world.fakes[replica]
    assert fake.bodies == [raw]  # not re-serialized
    sent = fake.headers[0]
    assert sent["x-request-id"] == "abc" and "authorization" not in sent
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-kvpilot-pick"] == "hash"


def test_the_same_prompt_goes_to_the_same_replica_and_others_spread(world):
    seen = {world.post(body("conversation one " * 20)).headers["x-kvpilot-replica"]
            for _ in range(4)}
    assert len(seen) == 1
    replicas = {world.post(body(f"conversation {i} " * 30)).headers["x-kvpilot-replica"]
                for i in range(30)}
    assert replicas == {"a", "b", "c"}
    assert world.metric("kvpilot_router_picks_total", model=MODEL, reason="prefix") >= 3


def test_chat_completions_route_the_same_way_and_stream_through(world):
    for f in world.fakes.values():
        f.behaviour = "stream"
    messages = [{"role": "system", "content": "You are terse. " * 10},
                {"role": "user", "content": "Tell me about pages. " * 5}]
    with httpx.stream("POST", world.url + "/v1/chat/completions", timeout=10, json={
            "model": MODEL, "messages": messages, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        text = b"".join(r.iter_raw())
    replica = r.headers["x-kvpilot-replica"]
    assert text == b"".join(event(f"{replica}-{i}") for i in range(3)) + event("", "stop") + \
        b"data: [DONE]\n\n"
    # the next turn extends the conversation: the same replica
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    r2 = world.post({"model": MODEL, "messages": messages, "stream": True},
                    path="/v1/chat/completions")
    assert r2.headers["x-kvpilot-replica"] == replica
    assert r2.headers["x-kvpilot-pick"] == "prefix"


def test_a_stream_arrives_as_the_replica_sends_it_not_when_it_ends(world):
    for f in world.fakes.values():
        f.behaviour, f.delay, f.events = "stream", 0.4, 3
    started = time.monotonic()
    arrivals = []
    with httpx.stream("POST", world.url + "/v1/completions", json=body(stream=True),
                      timeout=10) as r:
        for chunk in r.iter_raw():
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 3
    assert arrivals[0] < 0.3 and arrivals[-1] > 1.0  # the first event long before the end


def test_models_lists_every_model_with_its_ready_replicas(world):
    r = httpx.get(world.url + "/v1/models", timeout=5)
    assert r.json() == {"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 0, "owned_by": "kvpilot",
         "ready_replicas": 3}]}


def test_health_ready_metrics_and_unknown_paths(world):
    assert httpx.get(world.url + "/health").json() == {"status": "ok"}
    assert httpx.get(world.url + "/ready").status_code == 200
    world.post(body())
    assert world.metric("kvpilot_router_requests_total", model=MODEL, code="200") == 1
    assert world.metric("kvpilot_router_ready_replicas", model=MODEL) == 3
    assert world.metric("kvpilot_router_upstream_latency_seconds_count", model=MODEL) == 1
    r = httpx.get(world.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(world.url + "/v1/completions")
    assert r.status_code == 405


# -- bad input ---------------------------------------------------------------------------

def test_an_unknown_model_is_404_with_the_served_models(world):
    r = world.post({"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == "The model `gpt-4` does not exist; served models: `tiny`."
    assert not any(f.bodies for f in world.fakes.values())


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "hi"}', "the request has no `model`"),
    (b'{"model": 7, "prompt": "hi"}', "the request has no `model`"),
    (b'{"model": "", "prompt": "hi"}', "the request has no `model`"),
    (b'["tiny"]', "the request body must be a JSON object"),
    (b'{"model": "tiny",', "the request body is not valid JSON"),
    (b'\xff\xfe', "the request body is not valid JSON"),
    (b"[" * 50_000, "nested too deeply"),
])
def test_a_body_the_router_cannot_route_is_400(world, raw, message):
    r = world.post(raw)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_a_huge_body_is_413_from_its_length_or_as_it_passes_the_bound(world):
    big = json.dumps(body("x" * 100_000)).encode()
    r = world.post(big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["connection"] == "close"

    def chunks():  # no Content-Length: refused once 64 KiB have come
        for _ in range(1000):
            yield b"x" * 1024

    r = httpx.post(world.url + "/v1/completions", content=chunks(), timeout=10)
    assert r.status_code == 413
    assert not any(f.bodies for f in world.fakes.values())


def test_a_large_body_within_the_bound_is_parsed_off_the_loop_and_routed(loop):
    settings = RouterSettings(max_body_bytes=4 * 2**20, inline_parse_bytes=1024)
    w = World(loop, [Fake("a")], settings)
    try:
        r = w.post(body("p" * 2_000_000))
        assert r.status_code == 200 and len(w.fakes["a"].bodies[0]) > 2_000_000
    finally:
        w.close()


def test_a_client_that_sends_its_body_too_slowly_gets_408(world):
    with socket.create_connection(("127.0.0.1", world.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                  b"\r\ncontent-length: 100\r\n\r\n{\"model\":")
        answer = b""
        while chunk := s.recv(65536):  # until the router closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"did not arrive within 1 s" in answer


def test_a_connection_that_never_sends_a_whole_head_is_closed(loop):
    w = World(loop, [Fake("a")], FAST, bounds=ServerBounds(header_timeout=0.3))
    try:
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost:")
            started = time.monotonic()
            assert s.recv(1024) == b""  # closed by the router
            assert time.monotonic() - started < 2
    finally:
        w.close()


def test_no_ready_replica_is_503_with_retry_after(world):
    world.serve_only()
    r = world.post(body())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_ready_replica"
    assert "no ready replica of model `tiny`" in r.json()["error"]["message"]


# -- retries -----------------------------------------------------------------------------

@pytest.mark.parametrize("world", [{"a": "503", "b": "429", "c": "503"}], indirect=True)
def test_429_and_503_before_the_first_byte_try_the_other_replicas(world):
    world.fakes["c"].behaviour = "ok"
    r = world.post(body())
    assert r.status_code == 200 and r.headers["x-kvpilot-replica"] == "c"
    tried = sum(len(f.bodies) for f in world.fakes.values())
    assert world.metric("kvpilot_router_retries_total", model=MODEL) == tried - 1


@pytest.mark.parametrize("world", [{"a": "429", "b": "429", "c": "429"}], indirect=True)
def test_when_every_replica_says_429_the_client_gets_the_last_429(world):
    r = world.post(body())
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full"
    assert [len(f.bodies) for f in world.fakes.values()] == [1, 1, 1]


@pytest.mark.parametrize("world", [{"a": "503", "b": "503", "c": "503"}], indirect=True)
def test_when_every_replica_drains_the_client_gets_503_with_retry_after(world):
    r = world.post(body())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == "no_replica_available"
    assert "3 tried" in err["message"] and "answered 503" in err["message"]


@pytest.mark.parametrize("world", [{"a": "hang", "b": "hang", "c": "hang"}], indirect=True)
def test_a_hanging_replica_times_out_is_retried_once_then_503_with_the_reason(world):
    started = time.monotonic()
    r = world.post(body())
    took = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert "gave no answer within 1 s" in r.json()["error"]["message"]
    assert 1.9 < took < 4
    assert sum(len(f.bodies) for f in world.fakes.values()) == 2  # one retry
    # each abandoned upstream request was closed: the replica saw its client go
    deadline = time.monotonic() + 5
    while sum(f.aborted for f in world.fakes.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(f.aborted for f in world.fakes.values()) == 2
    assert world.metric("kvpilot_router_retries_total", model=MODEL, cause="timeout") == 2


def test_an_unreachable_replica_is_skipped(world):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    gone = endpoint("127.0.0.1", port, pod="gone")
    alive = world.routes(["a"]).models[MODEL].endpoints
    world.loop.call(world.table.publish, Routes({MODEL: ModelRoute(
        MODEL, "default", (gone, *alive))}))
    for i in range(6):
        r = world.post(body(f"prompt {i} " * 40))
        assert r.status_code == 200 and r.headers["x-kvpilot-replica"] == "a"
    assert world.metric("kvpilot_router_retries_total", model=MODEL, cause="connect") >= 1


# -- streams that end badly ----------------------------------------------------------------

def test_a_replica_that_dies_mid_stream_ends_it_with_an_error_event(world):
    for f in world.fakes.values():
        f.behaviour, f.events = "die", 3
    with httpx.stream("POST", world.url + "/v1/completions", json=body(stream=True),
                      timeout=10) as r:
        text = b"".join(r.iter_raw())
    replica = r.headers["x-kvpilot-replica"]
    head = event(f"{replica}-0") + event(f"{replica}-1") + b'data: {"choi'
    assert text.startswith(head)
    rest = text[len(head):]
    assert rest.startswith(b"\n\ndata: ") and rest.endswith(b"\n\n")  # a separate event
    error = json.loads(rest.strip()[len(b"data: "):])["error"]
    assert error["code"] == "upstream_lost"
    assert error["message"].startswith(f"replica {replica} went away (")
    assert error["message"].endswith("mid-response; the response is incomplete")
    assert b"[DONE]" not in text
    assert world.metric("kvpilot_router_upstream_lost_total", model=MODEL) == 1


def test_a_replica_silent_mid_stream_past_the_idle_timeout_ends_it_with_an_error(world):
    for f in world.fakes.values():
        f.behaviour, f.delay, f.events = "stream", 3.0, 2
    with httpx.stream("POST", world.url + "/v1/completions", json=body(stream=True),
                      timeout=10) as r:
        text = b"".join(r.iter_raw())
    assert b"sent nothing for 1 s mid-response; the response is incomplete" in text
    assert b"[DONE]" not in text


def test_a_client_that_disconnects_aborts_the_upstream_request(world):
    for f in world.fakes.values():
        f.behaviour, f.delay, f.events = "stream", 0.3, 50
    with httpx.stream("POST", world.url + "/v1/completions", json=body(stream=True),
                      timeout=10) as r:
        next(r.iter_raw())
    replica = world.fakes[r.headers["x-kvpilot-replica"]]
    deadline = time.monotonic() + 5
    while replica.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replica.aborted == 1 and replica.finished == 0
    assert world.metric("kvpilot_router_client_disconnects_total", model=MODEL) == 1
    assert world.metric("kvpilot_router_open_requests") == 0


def test_a_client_that_leaves_before_the_head_aborts_too(world):
    for f in world.fakes.values():
        f.behaviour, f.delay = "ok", 5.0
    settings_client = httpx.Client(timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        settings_client.post(world.url + "/v1/completions", json=body())
    settings_client.close()
    deadline = time.monotonic() + 5
    while sum(f.aborted for f in world.fakes.values()) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(f.aborted for f in world.fakes.values()) == 1


# -- API keys ------------------------------------------------------------------------------

def test_api_keys_refuse_missing_and_wrong_keys_alike(loop, tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-alpha\n\n  sk-beta  \n")
    w = World(loop, [Fake("a")], FAST, keys=ApiKeys(path))
    try:
        for headers in ({}, {"authorization": "Bearer sk-alp"}, {"authorization": "sk-alpha"},
                        {"authorization": "Bearer sk-alphaX"},
                        {"authorization": "Basic c2stYWxwaGE="}):
            r = w.post(body(), headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["message"] == \
                "missing or invalid API key (Authorization: Bearer KEY)"
            assert r.headers["www-authenticate"] == 'Bearer realm="kvpilot"'
        assert httpx.get(w.url + "/v1/models").status_code == 401
        for key in ("sk-alpha", "sk-beta"):
            r = w.post(body(), headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert httpx.get(w.url + "/v1/models", headers={
            "authorization": "bearer sk-beta"}).status_code == 200
        assert httpx.get(w.url + "/health").status_code == 200  # probes need no key
        assert "authorization" not in w.fakes["a"].headers[0]
        # rotated: the old key stops working once the file is read again
        path.write_text("sk-gamma\n")
        assert w.loop.call(w.router.keys.reload) is True
        assert w.post(body(), headers={"authorization": "Bearer sk-alpha"}).status_code == 401
        assert w.post(body(), headers={"authorization": "Bearer sk-gamma"}).status_code == 200
    finally:
        w.close()


def test_an_empty_keys_file_refuses_everything(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n")
    keys = ApiKeys(path)
    assert not keys.allows(b"Bearer ") and not keys.allows(b"Bearer x") and not keys.allows(None)
    with pytest.raises(ValueError, match="API keys file .*/missing"):
        ApiKeys(tmp_path / "missing")


def test_request_bodies_held_at_once_are_bounded_429_beyond(loop):
    settings = RouterSettings(max_body_bytes=64 * 1024, max_buffered_bytes=100 * 1024)
    w = World(loop, [Fake("a")], settings)
    try:
        w.fakes["a"].delay = 1.0  # holds each request, and so its body, for a second
        big = json.dumps(body("z" * 60_000)).encode()
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(w.post(big)))
        t.start()
        time.sleep(0.4)
        second = w.post(big)
        t.join(10)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "router_busy"
        assert first[0].status_code == 200
        assert w.post(big).status_code == 200  # released once answered
    finally:
        w.close()


def test_the_scraper_keeps_each_replicas_load_and_forgets_the_silent(loop):
    from kvpilot.router.loads import scrape_forever
    from kvpilot.router.scoring import Load

    w = World(loop, [Fake("a"), Fake("b")], FAST)
    try:
        w.fakes["a"].metrics = (b'kvpilot_kv_cache_usage_ratio{model="tiny"} 0.5\n'
                                b'kvpilot_requests_running{model="tiny"} 2\n'
                                b'kvpilot_requests_waiting{model="tiny"} 1\n')
        w.fakes["b"].metrics = b"# nothing of tiny yet\n"
        eps = w.table.routes.models[MODEL].endpoints
        names = {e.pod: e.name for e in eps}

        async def start():
            import httpx as hx

            client = hx.AsyncClient()
            task = asyncio.get_running_loop().create_task(scrape_forever(
                client, w.board, lambda: {e.name: (e.url, MODEL) for e in eps},
                interval=0.05, timeout=1))
            return client, task

        client, task = w.loop.run(start())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and w.loop.call(
                w.board.loads, [names["a"]])[names["a"]] == Load():
            time.sleep(0.05)
        loads = w.loop.call(w.board.loads, list(names.values()))
        assert loads == {names["a"]: Load(running=2, waiting=1, kv_usage=0.5),
                         names["b"]: Load()}
        w.fakes["a"].metrics = b""  # it stops exporting: forgotten, not kept as it was
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and w.loop.call(
                w.board.loads, [names["a"]])[names["a"]] != Load():
            time.sleep(0.05)
        assert w.loop.call(w.board.loads, [names["a"]]) == {names["a"]: Load()}

        async def stop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

        w.loop.run(stop())
    finally:
        w.close()
