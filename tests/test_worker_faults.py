"""The worker under faults (issue #29), served for real over the tiny checkpoint: a
streaming client that stops reading is cut off after ``write_timeout`` and its sequence
aborted (its pages freed), and twice the load its KV cache holds is served with
preemptions counted, every request answered in full or refused with an explicit 429,
and no page or resident memory left behind (the 10-minute version is
``benchmarks/worker_soak.py``).

Bounds are generous: they tell "bounded" from "forever", not fast from slow."""

from __future__ import annotations

import json
import socket
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kvpilot.worker.server import ServerSettings  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.server_helpers import Served, greedy  # noqa: E402

WRITE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def test_a_stream_nobody_reads_is_aborted_after_the_write_timeout(ckpt):
    # Small buffers towards the client: its stall is met after a few dozen tokens.
    served = Served(ckpt, ServerSettings(write_timeout=WRITE_TIMEOUT, write_buffer_bytes=4096),
                    max_model_len=4096, concurrent=2)
    try:
        max_tokens = 4000
        body = json.dumps(greedy(max_tokens, prompt="hi", stream=True)).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(served.addr)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: w\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        before = served.engine.fresh_stats().generation_tokens
        deadline = time.monotonic() + 30
        while served.engine.fresh_stats().running == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.02)
        # ... and this client reads nothing. The server must give up on it, abort the
        # sequence and free its pages, long before 4,000 tokens.
        stats = served.wait_idle(timeout=60)
        generated = stats.generation_tokens - before
        assert 0 < generated < max_tokens, generated
        sock.settimeout(10)
        got, closed = b"", False
        try:
            while chunk := sock.recv(65536):
                got += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        assert closed and b"[DONE]" not in got
        assert served.client.get("/health").status_code == 200
        sock.close()
    finally:
        served.close()


def test_write_timeout_is_checked():
    with pytest.raises(ValueError, match="write_timeout"):
        ServerSettings(write_timeout=0)


def test_twice_the_kv_capacity_preempts_and_answers_every_request_in_full_or_429(ckpt):
    """A short ``benchmarks/worker_soak.py``: 8 closed-loop clients on a pool that holds
    4 of their sequences."""
    from benchmarks.worker_soak import serve_tiny, soak

    worker = serve_tiny(ckpt, context=128, concurrent=4, max_waiting=4)
    try:
        r = soak(worker, seconds=20, clients=8, context=128)
    finally:
        worker.close()
    assert not r.tally.failures, r.tally.failures[:5]
    assert r.tally.done > 0 and r.preemptions > 0, (r.tally, r.preemptions)
    assert r.pages_left == 0
    (_, server0, core0), (_, server1, core1) = r.rss[0], r.rss[-1]
    # Flat, within allocator noise: a leak of a page pool's worth a request would show.
    assert server1 - server0 < 200 and core1 - core0 < 200, r.rss
