"""The router's HTTP side: a plain ASGI app (served by uvicorn) that passes OpenAI
requests to a replica of their Model.

A generation request (``POST /v1/completions``, ``/v1/chat/completions``) goes:

1. API key, if keys are configured (401 otherwise, the same answer for a missing key
   and a wrong one).
2. Body, bounded: 413 from its Content-Length or as soon as what came passes
   ``max_body_bytes``, 408 when it has not all come within ``body_timeout``, 429 when
   the bodies of all requests in flight would pass ``max_buffered_bytes``.
3. ``model`` and the prompt's head (``request.parse``; a large body is parsed on a
   thread, so the event loop only moves bytes). 400 without ``model``, 404 with the
   served models for an unknown one, 503 with ``Retry-After`` when the Model has no
   ready replica.
4. ``pick()`` a replica, send it the body exactly as received. Before the response
   head, a replica that says 429 or 503, cannot be reached, or gives no head within
   ``upstream_timeout`` (retried once) is left for another one the request has not
   tried, up to ``attempts``. When none takes it: the last 429 as it came, or 503 with
   ``Retry-After`` and the reason.
5. The response head, then its body chunk by chunk as the replica sends it: one chunk
   in flight, so a slow client slows the replica's stream instead of filling the
   router's memory (``send_timeout`` drops a client that reads nothing). A replica that
   goes silent for ``idle_timeout`` or away mid-response ends an event stream with an
   error event (never a silent truncation: no ``[DONE]``); any other body is cut with
   the connection, which the client sees as an incomplete response.
6. A client that disconnects at any point cancels the request, which closes the
   upstream connection: the worker aborts the sequence and frees its pages.

``/v1/models`` lists every Model with a Service (ready replicas or not); ``/health``
is liveness, ``/ready`` is 200 once the EndpointSlices were listed; ``/metrics`` the
router's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import aiohttp

from kvpilot.router.auth import ApiKeys
from kvpilot.router.endpoints import Endpoint, ModelRoute, Routes
from kvpilot.router.loads import LoadBoard
from kvpilot.router.metrics import NO_MODEL, RouterMetrics
from kvpilot.router.prefix import PrefixIndex, block_hashes
from kvpilot.router.request import BadRequest, RequestHead, parse
from kvpilot.router.scoring import Candidate, Pick, Policy, RequestKey, pick

log = logging.getLogger("kvpilot.router")

GENERATE = ("/v1/completions", "/v1/chat/completions")
# Never forwarded: hop-by-hop headers, what the client library sets itself, and the
# router's own key.
_DROP_REQUEST = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                           b"trailer", b"transfer-encoding", b"upgrade", b"host",
                           b"content-length", b"expect", b"authorization",
                           b"proxy-authorization"})
_DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                            b"trailer", b"transfer-encoding", b"upgrade", b"server", b"date"})
_JSON = (b"content-type", b"application/json")
_REFUSAL_BYTES = 64 * 1024  # of a 429/503 body kept to pass on


@dataclass(frozen=True)
class RouterSettings:
    """Bounds and timeouts; the tests shorten them."""

    policy: Policy = Policy()
    block_chars: int = 64  # prompt characters per prefix block
    max_blocks: int = 32  # prefix blocks read: the prompt's first 2,048 characters
    max_body_bytes: int = 8 * 2**20  # as the worker's
    # Body bytes all requests in flight may hold at once; a request that would pass it
    # gets 429 (connections x max_body_bytes could otherwise exhaust memory).
    max_buffered_bytes: int = 256 * 2**20
    inline_parse_bytes: int = 64 * 1024  # larger bodies are parsed on a thread
    body_timeout: float = 30.0  # seconds for a whole request body, once its head is in
    connect_timeout: float = 2.0  # seconds to connect to a replica
    upstream_timeout: float = 120.0  # seconds to a replica's response head
    idle_timeout: float = 120.0  # seconds a replica may stay silent mid-response
    send_timeout: float = 60.0  # seconds a client may read nothing
    attempts: int = 3  # replicas tried per request (429, 503, unreachable, silent)
    timeout_retries: int = 1  # of those, after a replica gave no head in time
    retry_after: int = 1  # seconds, in Retry-After of the router's own 503s
    upstream_connections: int = 1024  # to all replicas, open at once
    upstream_keepalive: float = 4.0  # seconds an idle connection to a replica is kept

    def __post_init__(self) -> None:
        for name in ("block_chars", "max_blocks", "max_body_bytes", "max_buffered_bytes",
                     "attempts", "upstream_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout", "connect_timeout", "upstream_timeout", "idle_timeout",
                     "send_timeout", "upstream_keepalive"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.timeout_retries < 0:
            raise ValueError("timeout_retries must be >= 0")


def upstream_client(s: RouterSettings) -> aiohttp.ClientSession:
    """Connections to replicas: at most ``upstream_connections``, kept alive for less
    than the worker keeps an idle one (5 s), so the router rarely sends on a connection
    the worker is closing. aiohttp, not httpx, on this hot path: its C parser makes its
    client several times faster (docs/router.md). Nothing is added to a request: no
    default Accept, Accept-Encoding or User-Agent (the client's pass through), no
    decompression."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=s.upstream_connections, limit_per_host=0,
                                       keepalive_timeout=s.upstream_keepalive),
        timeout=aiohttp.ClientTimeout(total=None, connect=s.upstream_timeout,
                                      sock_connect=s.connect_timeout,
                                      sock_read=s.idle_timeout),
        auto_decompress=False, skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        trust_env=False)


class RouteTable:
    """The current ``Routes``; replaced whole when the EndpointSlices change."""

    def __init__(self, routes: Routes | None = None) -> None:
        self.routes = routes or Routes()
        self.version = 0

    def publish(self, routes: Routes) -> None:
        old = {m: len(r.endpoints) for m, r in self.routes.models.items()}
        new = {m: len(r.endpoints) for m, r in routes.models.items()}
        self.routes = routes
        self.version += 1
        if old != new:
            log.info("replicas: %s", ", ".join(f"{m} {n}" for m, n in new.items()) or "none")
        for name, spaces in routes.conflicts.items():
            log.warning("model %s is served in namespaces %s: its requests are refused "
                        "(run a router per namespace: --namespace)", name, ", ".join(spaces))


class _Answer(Exception):
    """An answer the router gives itself (an error), raised from deep in a request."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": self.param, "code": self.code}}).encode()


class _ClientGone(Exception):
    pass


_CLOSE = ((b"connection", b"close"),)


def _unavailable(message: str, code: str, retry_after: int) -> _Answer:
    return _Answer(503, message, type="service_unavailable", code=code,
                   headers=((b"retry-after", str(retry_after).encode()),))


def _error_event(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {
        "message": message, "type": "server_error", "param": None,
        "code": "upstream_lost"}}).encode() + b"\n\n"


class Router:
    """The ASGI app. Its collaborators are given: the route table (kept by discovery),
    the load board (kept by the scraper), the prefix index, the upstream client."""

    def __init__(self, settings: RouterSettings, table: RouteTable, board: LoadBoard,
                 client: aiohttp.ClientSession, *, keys: ApiKeys | None = None,
                 ready: Callable[[], bool] = lambda: True,
                 index: PrefixIndex | None = None) -> None:
        self.s = settings
        self.table = table
        self.board = board
        self.client = client
        self.keys = keys
        self.ready = ready
        self.index = index or PrefixIndex()
        self.metrics = RouterMetrics(lambda: sum(board.open.values()), self._replicas)
        self._seq: dict[str, int] = {}
        self._buffered = 0  # body bytes held by requests in flight
        self._head_chars = settings.block_chars * settings.max_blocks

    def _replicas(self) -> dict[str, int]:
        return {m: len(r.endpoints) for m, r in self.table.routes.models.items()}

    # ---- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in GENERATE:
            if method != "POST":
                return await self._error(send, _Answer(405, f"{method} is not allowed on {path}",
                                                       code="method_not_allowed"))
            return await self._generate(scope, receive, send)
        if method not in ("GET", "HEAD"):
            return await self._error(send, _Answer(405, f"{method} is not allowed on {path}",
                                                   code="method_not_allowed"))
        if path == "/v1/models":
            if self.keys is not None and not self.keys.allows(_header(scope, b"authorization")):
                return await self._error(send, _unauthorized())
            return await self._json(send, 200, self._models())
        if path == "/health":
            return await self._json(send, 200, {"status": "ok"})
        if path == "/ready":
            ok = self.ready()
            return await self._json(send, 200 if ok else 503,
                                    {"status": "ready" if ok else "not synced"})
        if path == "/metrics":
            body = self.metrics.render()
            return await self._respond(send, 200, body, ((b"content-type",
                                                         b"text/plain; version=0.0.4"),))
        return await self._error(send, _Answer(404, f"no such endpoint: {method} {path}",
                                               code="not_found"))

    def _models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "kvpilot",
             "ready_replicas": len(route.endpoints)}
            for name, route in self.table.routes.models.items()]}

    # ---- generation ---------------------------------------------------------------------
    async def _generate(self, scope: dict, receive, send) -> None:
        model = NO_MODEL
        held = [0]
        try:
            if self.keys is not None and not self.keys.allows(_header(scope, b"authorization")):
                raise _unauthorized()
            raw = await self._read_body(scope, receive, held)
            head = await self._parse(raw)
            route = self._route(head.model)
            model = route.name
            await self._forward(scope, receive, send, raw, head, route)
        except _Answer as answer:
            self.metrics.requests.labels(model, str(answer.status)).inc()
            await self._error(send, answer)
        except _ClientGone:
            if model != NO_MODEL:
                self.metrics.client_gone.labels(model).inc()
        finally:
            self._buffered -= held[0]

    async def _read_body(self, scope: dict, receive, held: list[int]) -> bytes:
        """The body; ``held[0]`` is what it counts against ``max_buffered_bytes``."""
        limit = self.s.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.s.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    if self._buffered + len(chunk) > self.s.max_buffered_bytes:
                        raise _Answer(429, "the router holds too many request bodies; retry "
                                      "later", type="rate_limit_error", code="router_busy",
                                      headers=((b"retry-after", b"1"), *_CLOSE))
                    self._buffered += len(chunk)
                    held[0] += len(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Answer(408, f"the request body did not arrive within "
                          f"{self.s.body_timeout:g} s", code="request_timeout",
                          headers=_CLOSE) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _parse(self, raw: bytes) -> RequestHead:
        try:
            if len(raw) <= self.s.inline_parse_bytes:
                return parse(raw, self._head_chars)
            return await asyncio.to_thread(parse, raw, self._head_chars)
        except BadRequest as err:
            raise _Answer(400, err.message, param=err.param) from None

    def _route(self, model: str) -> ModelRoute:
        routes = self.table.routes
        route = routes.models.get(model)
        if route is not None:
            return route
        if model in routes.conflicts:
            raise _Answer(409, f"the model `{model}` is served in several namespaces ("
                          f"{', '.join(routes.conflicts[model])}); this router cannot tell "
                          "which one you mean", param="model", code="model_ambiguous")
        served = ", ".join(f"`{m}`" for m in routes.models) or "none"
        raise _Answer(404, f"The model `{model[:256]}` does not exist; served models: "
                      f"{served}.", param="model", code="model_not_found")

    def _choose(self, route: ModelRoute, key: RequestKey, tried: set[str]
                ) -> tuple[Optional[Endpoint], Optional[Pick]]:
        left = [e for e in route.endpoints if e.name not in tried]
        if not left:
            return None, None
        names = [e.name for e in left]
        cached = (self.index.matches(key.blocks, names) if key.blocks and
                  self.s.policy.mode == "prefix" else {})
        choice = pick([Candidate(n, cached.get(n, 0)) for n in names], key,
                      self.board.loads(names), self.s.policy)
        return next(e for e in left if e.name == choice.name), choice

    async def _forward(self, scope: dict, receive, send, raw: bytes, head: RequestHead,
                       route: ModelRoute) -> None:
        model = route.name
        if not route.endpoints:
            raise _unavailable(f"no ready replica of model `{model}`; retry later",
                               "no_ready_replica", self.s.retry_after)
        seq = self._seq[model] = self._seq.get(model, -1) + 1
        blocks = (block_hashes(head.prompt_head, self.s.block_chars, seed=model)
                  if self.s.policy.mode == "prefix" else ())
        key = RequestKey(blocks, seq)
        headers = _forward_headers(scope)
        path = scope["path"] + (("?" + scope["query_string"].decode("latin-1"))
                                if scope.get("query_string") else "")
        tried: set[str] = set()
        timeouts = 0
        refusal: Optional[tuple[int, list, bytes]] = None  # the last 429, to pass on
        why = ""
        task = asyncio.current_task()
        state = {"done": False, "gone": False}

        async def watch() -> None:  # the client's disconnect cancels the request
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["done"]:
                        state["gone"] = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            for _ in range(self.s.attempts):
                endpoint, choice = self._choose(self.table.routes.models.get(model, route),
                                                key, tried)
                if endpoint is None:
                    break
                tried.add(endpoint.name)
                self.metrics.picks.labels(model, choice.reason).inc()
                replica = endpoint.pod or endpoint.name
                self.board.opened(endpoint.name)
                resp: Optional[aiohttp.ClientResponse] = None
                try:
                    sent = time.perf_counter()
                    try:
                        resp = await self._send(endpoint.url + path, raw, headers)
                    except TimeoutError:
                        timeouts += 1
                        refusal = None
                        why = f"replica {replica} gave no answer within " \
                              f"{self.s.upstream_timeout:g} s"
                        self.metrics.retries.labels(model, "timeout").inc()
                        if timeouts > self.s.timeout_retries:
                            break
                        continue
                    except aiohttp.ClientError as err:
                        refusal = None
                        why = f"replica {replica} could not be reached ({type(err).__name__})"
                        self.metrics.retries.labels(model, "connect").inc()
                        continue
                    if resp.status in (429, 503):
                        body = await _read_capped(resp, _REFUSAL_BYTES)
                        refusal = ((resp.status, _response_headers(resp), body)
                                   if resp.status == 429 else None)
                        why = f"replica {replica} answered {resp.status}"
                        self.metrics.retries.labels(model, str(resp.status)).inc()
                        continue
                    self.metrics.latency.labels(model).observe(time.perf_counter() - sent)
                    if resp.status == 200 and blocks:
                        self.index.record(endpoint.name, blocks)
                    await self._relay(send, resp, replica, choice, model, state)
                    self.metrics.requests.labels(model, str(resp.status)).inc()
                    return
                finally:
                    if resp is not None:
                        # Back to the pool when read to its end; otherwise closed, which
                        # is how the replica learns to abort the request.
                        if resp.content.at_eof():
                            resp.release()
                        else:
                            resp.close()
                    self.board.closed(endpoint.name)
        except asyncio.CancelledError:
            if state["gone"] and task.uncancel() == 0:
                raise _ClientGone() from None
            raise
        finally:
            state["done"] = True
            watcher.cancel()
        if refusal is not None:  # the last replica tried said 429: its answer, as it came
            status, resp_headers, body = refusal
            self.metrics.requests.labels(model, str(status)).inc()
            await self._respond(send, status, body, resp_headers)
            return
        if not tried:
            raise _unavailable(f"no ready replica of model `{model}`; retry later",
                               "no_ready_replica", self.s.retry_after)
        raise _unavailable(f"no replica of model `{model}` took the request ({len(tried)} "
                           f"tried; last: {why})", "no_replica_available",
                           self.s.retry_after)

    async def _send(self, url: str, raw: bytes, headers: list[tuple[str, str]]
                    ) -> aiohttp.ClientResponse:
        """POST to a replica, up to its response head. A kept-alive connection the
        replica closed while idle fails before anything was read: sent once more on a
        fresh connection (nothing reached the worker), not counted as a failure."""
        async with asyncio.timeout(self.s.upstream_timeout):
            try:
                return await self.client.post(url, data=raw, headers=headers)
            except aiohttp.ServerDisconnectedError:
                return await self.client.post(url, data=raw, headers=headers)

    async def _relay(self, send, resp: aiohttp.ClientResponse, replica: str, choice: Pick,
                     model: str, state: dict) -> None:
        headers = _response_headers(resp)
        headers.append((b"x-kvpilot-replica", replica.encode()))
        headers.append((b"x-kvpilot-pick", choice.reason.encode()))
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": headers})
        event_stream = resp.content_type == "text/event-stream"
        tail = b"\n\n"
        content = resp.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as err:
                self.metrics.lost.labels(model).inc()
                what = (f"sent nothing for {self.s.idle_timeout:g} s" if isinstance(
                    err, TimeoutError) else f"went away ({type(err).__name__})")
                message = f"replica {replica} {what} mid-response; the response is incomplete"
                log.warning("%s: %s", model, message)
                if event_stream:
                    state["done"] = True
                    await send({"type": "http.response.body", "more_body": False, "body": (
                        b"" if tail == b"\n\n" else b"\n\n") + _error_event(message)})
                # Otherwise return with the response incomplete: uvicorn closes the
                # connection, and the client sees a body shorter than announced.
                return
            if not chunk:
                break
            try:
                async with asyncio.timeout(self.s.send_timeout):
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            except TimeoutError:
                log.info("a client of %s read nothing for %g s: dropped", model,
                         self.s.send_timeout)
                raise _ClientGone() from None
            tail = chunk[-2:] if len(chunk) >= 2 else tail[-1:] + chunk
        state["done"] = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # ---- plain answers ------------------------------------------------------------------
    async def _respond(self, send, status: int, body: bytes,
                       headers: Any = ((b"content-type", b"application/json"),)) -> None:
        head = [h for h in headers if h[0] != b"content-length"]
        head.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _json(self, send, status: int, obj: Any) -> None:
        await self._respond(send, status, json.dumps(obj).encode(), (_JSON,))

    async def _error(self, send, answer: _Answer) -> None:
        await self._respond(send, answer.status, answer.body(), (_JSON, *answer.headers))


def _unauthorized() -> _Answer:
    return _Answer(401, "missing or invalid API key (Authorization: Bearer KEY)",
                   code="invalid_api_key",
                   headers=((b"www-authenticate", b'Bearer realm="kvpilot"'),))


def _too_large(limit: int) -> _Answer:
    return _Answer(413, f"the request body is larger than {limit} bytes",
                   code="request_too_large", headers=_CLOSE)


def _header(scope: dict, name: bytes) -> Optional[bytes]:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _forward_headers(scope: dict) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
            if k not in _DROP_REQUEST]


def _response_headers(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in resp.raw_headers if k.lower() not in _DROP_RESPONSE]


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    out = bytearray()
    try:
        while len(out) < cap and (chunk := await resp.content.readany()):
            out += chunk[:cap - len(out)]
    except (aiohttp.ClientError, TimeoutError):
        pass
    return bytes(out)
