"""uvicorn's h11 protocol with the bounds it lacks against idle clients, for the worker's
and the router's servers (both import it; neither imports the other).

uvicorn arms its keep-alive timer only after a response, and cancels it on the first
byte of the next request: a connection that sends nothing, or half a request head, stays
open forever (21,000 of them ran a worker out of descriptors). Here a timer runs from the
opening and from each response until a whole request head is in, and closes the
connection at ``header_timeout``; a connection answered before its body was all read is
closed, not read on. uvicorn's ``limit_concurrency`` answers 503 only once a request
arrives and never closes anything, so the connection cap is kept here, when the
connection is made.

A client that stops reading a response (a stream's client that went away without closing,
or one that holds its socket open and reads nothing) would hold its request forever:
uvicorn waits for the transport's buffer to drain with no timeout. With
``write_timeout``, a connection whose writes make no progress for that long (the buffer
stays above its high-water mark) is aborted, which the app sees as a disconnect.
``write_buffer`` (bytes) caps what is buffered towards a client, in the transport and in
the socket's send buffer; None leaves asyncio's 64 KiB and the kernel's autotuning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket


def too_many_connections(who: str, retry_after: int = 1) -> bytes:
    """The whole HTTP answer to a connection beyond the cap: 503, JSON, then close."""
    body = json.dumps({"error": {"message": f"{who} has too many open connections; "
                                 "retry later", "type": "service_unavailable", "param": None,
                                 "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: {retry_after}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def bounded_protocol(*, max_connections: int, header_timeout: float, refusal: bytes,
                     log: logging.Logger, write_timeout: float | None = None,
                     write_buffer: int | None = None) -> type:
    """The protocol class to give uvicorn (``http=``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d are open (max_connections)",
                            len(self.connections) - 1)
                transport.write(refusal)
                transport.close()
                return
            if write_buffer is not None:
                transport.set_write_buffer_limits(high=write_buffer)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, write_buffer)
            self._await_head()

        def _await_head(self) -> None:
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

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
                # Answered before its body was all read (/health with a body): uvicorn
                # would read on and throw it away, for as long as the client sends.
                self.transport.close()
            elif self.conn.their_state is h11.IDLE:
                self._await_head()

        def pause_writing(self) -> None:
            super().pause_writing()
            if write_timeout is not None and self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_late)

        def resume_writing(self) -> None:
            self._stop_write_timer()
            super().resume_writing()

        def _stop_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_late(self) -> None:
            self._write_timer = None
            log.warning("aborted a connection whose client read nothing for %gs "
                        "(write_timeout)", write_timeout)
            self.transport.abort()  # close() would wait for the buffer to drain

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            self._stop_write_timer()
            super().connection_lost(exc)

    return BoundedH11Protocol
