"""Shared by the worker's server tests: the worker served for real on a loopback port,
its engine core in a process of its own, and a greedy request body."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from kvpilot.worker.client import EngineClient
from kvpilot.worker.ipc import CoreStart
from kvpilot.worker.server import ServerSettings, WorkerState, create_app, uvicorn_config
from tests.worker_helpers import tiny_settings

NAME = "tiny"


class Served:
    """A worker on 127.0.0.1: its engine core in a process of its own (started as
    ``python -m kvpilot.worker`` starts it, with the tiny checkpoint's settings), and the
    app served by uvicorn in this process, which is the server's process. ``engine`` is
    the app's view of the core (``EngineClient``: its facts, tokenizer and stats)."""

    def __init__(self, ckpt, settings: ServerSettings | None = None, *, max_waiting=8, **kw):
        self.ckpt = ckpt
        self.engine = EngineClient(CoreStart(settings=tiny_settings(ckpt, **kw)),
                                   model_dir=str(ckpt), max_waiting=max_waiting,
                                   stop_timeout=30)
        self.engine.start()
        self.engine.wait_ready(timeout=120)
        self.state = WorkerState(name=NAME, engine=self.engine)
        self.app = create_app(self.state, settings or ServerSettings())
        config = uvicorn_config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.addr = ("127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()

    def wait_idle(self, timeout=20.0):
        """The engine's stats once nothing runs or waits and no page is held, each look
        taken after everything sent so far reached the core."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.fresh_stats()
            if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
                return s
            time.sleep(0.02)
        raise AssertionError(f"engine still busy: {self.engine.fresh_stats()}")


def greedy(max_tokens=8, **kw):
    return {"model": NAME, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, **kw}
