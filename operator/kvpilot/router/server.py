"""uvicorn for the router, with the bounds it lacks against idle and slow clients
(``kvpilot.http_bounds``, shared with the worker's server): a connection without a
whole request head within ``header_timeout`` is closed, and connections beyond
``max_connections`` are answered 503 and closed when they are made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvpilot import http_bounds

log = logging.getLogger("kvpilot.router")


@dataclass(frozen=True)
class ServerBounds:
    header_timeout: float = 10.0  # seconds to a whole request head
    keep_alive_timeout: int = 30  # seconds an idle keep-alive connection stays open
    max_connections: int = 4096
    max_header_bytes: int = 16 * 1024


def bounded_protocol(bounds: ServerBounds) -> type:
    """uvicorn's h11 protocol bounded by ``bounds`` (``kvpilot.http_bounds``)."""
    return http_bounds.bounded_protocol(
        max_connections=bounds.max_connections, header_timeout=bounds.header_timeout,
        refusal=http_bounds.too_many_connections("the router"), log=log)


def uvicorn_config(app, *, host: str, port: int, bounds: ServerBounds,
                   log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          lifespan="off", http=bounded_protocol(bounds),
                          timeout_keep_alive=bounds.keep_alive_timeout,
                          h11_max_incomplete_event_size=bounds.max_header_bytes,
                          server_header=False)
