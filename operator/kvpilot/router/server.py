"""uvicorn for the router, with the bounds it lacks against idle and slow clients.

uvicorn arms its keep-alive timer only after a response and cancels it on the first byte
of the next request, so a connection that sends nothing, or half a request head, would
stay open forever. Here a timer runs from the opening and from each response until a
whole request head is in, and closes the connection at ``header_timeout``; connections
beyond ``max_connections`` are answered 503 and closed when they are made. (The worker's
server does the same; the router does not import the worker, whose package needs the
engine's dependencies.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

log = logging.getLogger("kvpilot.router")


@dataclass(frozen=True)
class ServerBounds:
    header_timeout: float = 10.0  # seconds to a whole request head
    keep_alive_timeout: int = 30  # seconds an idle keep-alive connection stays open
    max_connections: int = 4096
    max_header_bytes: int = 16 * 1024


def _refusal() -> bytes:
    body = json.dumps({"error": {"message": "the router has too many open connections; "
                                 "retry later", "type": "service_unavailable", "param": None,
                                 "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nretry-after: 1\r\n"
            b"connection: close\r\n\r\n" + body)


def bounded_protocol(bounds: ServerBounds) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal = _refusal()

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > bounds.max_connections:
                log.warning("refused a connection: %d are open (max_connections)",
                            len(self.connections) - 1)
                transport.write(refusal)
                transport.close()
                return
            self._await_head()

        def _await_head(self) -> None:
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(bounds.header_timeout, self._head_late)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
                self._stop_head_timer()  # the head is in; the app bounds the body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                self.transport.close()  # answered before its body was read (413): no more
            elif self.conn.their_state is h11.IDLE:
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

    return BoundedH11Protocol


def uvicorn_config(app, *, host: str, port: int, bounds: ServerBounds,
                   log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          lifespan="off", http=bounded_protocol(bounds),
                          timeout_keep_alive=bounds.keep_alive_timeout,
                          h11_max_incomplete_event_size=bounds.max_header_bytes,
                          server_header=False)
