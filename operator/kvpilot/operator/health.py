"""``/healthz`` for the operator's probes, served from start-up on, leader or not.

A standby replica (waiting for the Lease) is healthy: it must pass its probes, or a
rollout with several replicas would never finish. The leader is healthy while its fleet
loop completes passes; one that has not finished a pass for ``stale_after`` seconds is
stuck, and the kubelet restarts it (a standby takes the Lease meanwhile).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health:
    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.leading_since: float | None = None
        self.last_pass: float | None = None

    def leading(self) -> None:
        self.leading_since = time.monotonic()

    def standing_by(self) -> None:
        """The Lease was lost: a standby again, healthy while it waits."""
        self.leading_since = self.last_pass = None

    def passed(self) -> None:
        self.last_pass = time.monotonic()

    def problem(self) -> str | None:
        """Why the operator is unhealthy, or None."""
        if self.leading_since is None:
            return None  # standing by is healthy
        last = self.last_pass or self.leading_since
        idle = time.monotonic() - last
        if idle > self.stale_after:
            return f"leading, but no fleet pass finished for {idle:.0f}s"
        return None

    def serve(self, port: int) -> ThreadingHTTPServer | None:
        if not port:
            return None
        health = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/healthz":
                    self.send_error(404)
                    return
                why = health.problem()
                body = (why or "ok").encode()
                self.send_response(500 if why else 200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="healthz").start()
        return server
