"""Stand-in workers for autoscaling tests: the worker side of the contract, test-driven.

For every Running worker pod of the local cluster, a tiny HTTP server listens on the
pod's own loopback IP and port, exactly where the operator looks for the real worker.
It serves ``/metrics`` with KV figures the test sets (per Model) and ``/drain``, which
reports drained only when the test says so. ``misbehave(pod, how)`` makes one pod's
``/metrics`` fail as a broken worker's would (``MISBEHAVIOURS``): hang, answer a byte a
second, answer garbage, or answer 10 MB. Tests of the real worker engine use the
real worker; these test the operator's side alone, with signals under the test's
control.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvpilot.api import contract
from kvpilot.operator.objects import LABEL_MODEL, SELECTOR

from e2e.cluster import Cluster

CAPACITY = 10 * 2**30
MISBEHAVIOURS = ("hang", "slow", "garbage", "huge")


@dataclass
class Signals:
    pressure: float = 0.0
    waiting: int = 0
    drains: bool = True  # a drain finishes as soon as it is asked for


@dataclass
class Worker:
    pod: str
    model: str
    ip: str
    server: ThreadingHTTPServer
    drain_asked: float | None = None  # when /drain was first POSTed


@dataclass
class FakeWorkers:
    cluster: Cluster
    port: int = contract.WORKER_PORT
    signals: dict[str, Signals] = field(default_factory=dict)  # model -> signals
    workers: dict[str, Worker] = field(default_factory=dict)  # pod -> worker
    broken: dict[str, str] = field(default_factory=dict)  # pod -> one of MISBEHAVIOURS
    _stop: threading.Event = field(default_factory=threading.Event)

    def set(self, model: str, **values) -> None:
        sig = self.signals.setdefault(model, Signals())
        for k, v in values.items():
            setattr(sig, k, v)

    def misbehave(self, pod: str, how: str | None) -> None:
        """Make ``pod``'s /metrics misbehave (None: answer properly again)."""
        if how is None:
            self.broken.pop(pod, None)
        else:
            assert how in MISBEHAVIOURS, how
            self.broken[pod] = how

    def start(self) -> "FakeWorkers":
        threading.Thread(target=self._follow, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in list(self.workers.values()):
            w.server.shutdown()
            w.server.server_close()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.cluster.get("pods", "-l", SELECTOR)
            except Exception:  # the cluster may be busy; try again
                time.sleep(0.5)
                continue
            live = set()
            for p in pods["items"]:
                if (p["status"].get("phase") == "Running" and p["status"].get("podIP")
                        and not p["metadata"].get("deletionTimestamp")):
                    live.add(p["metadata"]["name"])
            # The gone first: a new pod may have the IP of one that just went.
            for name in set(self.workers) - live:
                w = self.workers.pop(name)
                w.server.shutdown()
                w.server.server_close()
            for p in pods["items"]:
                name = p["metadata"]["name"]
                if name in live and name not in self.workers:
                    try:
                        self.workers[name] = self._serve(
                            name, p["metadata"]["labels"][LABEL_MODEL], p["status"]["podIP"])
                    except OSError:  # its address is still held: the next look
                        pass
            time.sleep(0.3)

    def _serve(self, pod: str, model: str, ip: str) -> Worker:
        fakes = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drain_status(self) -> str:
                sig = fakes.signals.get(model, Signals())
                w = fakes.workers.get(pod)
                draining = w is not None and w.drain_asked is not None
                return json.dumps({"draining": draining, "drained": draining and sig.drains,
                                   "running": 0 if sig.drains else 1, "waiting": 0})

            def _misbehave(self, how: str) -> None:
                if how == "hang":  # until the operator gives up (or the fakes stop)
                    fakes._stop.wait(600)
                    return
                if how == "slow":  # a byte a second, of a body that never ends
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**6))
                    self.end_headers()
                    while not fakes._stop.wait(1.0):
                        self.wfile.write(b"#")
                        self.wfile.flush()
                    return
                if how == "garbage":
                    self._send(200, "\x00{{{ <html>not metrics</html>\n" * 50, "text/plain")
                    return
                label = f'{{{contract.LABEL_MODEL}="{model}"}}'  # huge: 10 MB, valid
                pad = "".join(f"kvpilot_pad{{i=\"{i}\"}} 1\n" for i in range(10 * 2**20 // 24))
                self._send(200, f"{contract.KV_USED_BYTES}{label} 0\n"
                           f"{contract.KV_CAPACITY_BYTES}{label} {CAPACITY}\n" + pad,
                           "text/plain; version=0.0.4")

            def do_GET(self) -> None:
                how = fakes.broken.get(pod)
                if self.path == contract.PATH_METRICS and how:
                    try:
                        self._misbehave(how)
                    except OSError:  # the operator gave up on it and closed
                        pass
                elif self.path == contract.PATH_METRICS:
                    sig = fakes.signals.get(model, Signals())
                    label = f'{{{contract.LABEL_MODEL}="{model}"}}'
                    lines = [
                        f"{contract.KV_USED_BYTES}{label} {int(sig.pressure * CAPACITY)}",
                        f"{contract.KV_CAPACITY_BYTES}{label} {CAPACITY}",
                        f"{contract.REQUESTS_WAITING}{label} {sig.waiting}",
                        f"{contract.REQUESTS_RUNNING}{label} 1",
                    ]
                    self._send(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4")
                elif self.path == contract.PATH_DRAIN:
                    self._send(200, self._drain_status())
                else:
                    self._send(200 if self.path in (contract.PATH_HEALTH, contract.PATH_READY)
                               else 404, "{}")

            def do_POST(self) -> None:
                if self.path != contract.PATH_DRAIN:
                    self._send(404, "{}")
                    return
                w = fakes.workers.get(pod)
                if w is not None and w.drain_asked is None:
                    w.drain_asked = time.monotonic()
                self._send(200, self._drain_status())

        server = ThreadingHTTPServer((ip, self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return Worker(pod, model, ip, server)
