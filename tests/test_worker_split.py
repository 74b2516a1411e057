"""The worker as two processes: the HTTP server (this test's process, or
``python -m kvpilot.worker``) and the engine core (``kvpilot.worker.core``, its child),
over the tiny checkpoint on CPU. What must hold across the split: a core that dies fails
/health and ends every request in flight with an error; a client that disconnects frees
its pages in the core; the core's stats reach /metrics; a drain; the server's process
never loads torch; the core's reasons reach the termination message."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvpilot.api import contract  # noqa: E402
from kvpilot.worker.model import load_config  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.layering_helpers import imported_heavy  # noqa: E402
from tests.server_helpers import NAME, Served, greedy  # noqa: E402
from tests.worker_helpers import WorkerProcess, proc_parent  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


# Long enough that a stream is still running after a few round trips between processes:
# the tiny model makes a token in about a millisecond.
CONTEXT = 4096
LONG = 3000


def long_served(ckpt) -> Served:
    return Served(ckpt, max_model_len=CONTEXT, concurrent=4)


@pytest.fixture(scope="module")
def served(ckpt):
    s = long_served(ckpt)
    yield s
    s.close()


def metrics(served) -> dict:
    text = served.client.get(contract.PATH_METRICS).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("model") == NAME}


def first_event(lines) -> dict:
    """The next event of a stream's ``iter_lines()``. One iterator per stream, kept
    until the stream ends: each buffers what it has read, and one dropped unfinished
    closes the connection (the server sees the client go)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("the stream ended before its first event")


def rest_of(lines) -> list:
    return [data if data == "[DONE]" else json.loads(data)
            for data in (line[len("data: "):] for line in lines if line.startswith("data: "))]


# ---- the boundary -----------------------------------------------------------------------
@pytest.mark.parametrize("module", ["kvpilot.worker.server", "kvpilot.worker.client",
                                    "kvpilot.worker.ipc", "kvpilot.worker.__main__"])
def test_the_server_side_imports_no_torch(module):
    assert imported_heavy(module) == []


def test_the_server_knows_the_engine_by_its_facts(served, ckpt):
    facts = served.engine.facts
    cfg = load_config(ckpt)
    assert (facts.name, facts.max_model_len, facts.vocab_size) == (NAME, CONTEXT, cfg.vocab_size)
    assert (facts.page_size, facts.num_pages, facts.device) == (16, CONTEXT * 4 // 16, "cpu")
    assert facts.tensor_parallel == 1
    assert facts.pid == served.engine.proc.pid != os.getpid()


# ---- stats and metrics ------------------------------------------------------------------
def test_stats_and_metrics_cross_the_split(served):
    before = served.wait_idle()
    prompt = served.engine.tokenizer.encode("count the pages")
    with served.client.stream("POST", "/v1/completions", json=greedy(
            prompt=prompt, max_tokens=LONG, stream=True)) as r:
        lines = r.iter_lines()  # kept: an iterator dropped unfinished closes the connection
        first_event(lines)
        during = served.engine.fresh_stats()
        assert during.running == 1 and during.waiting == 0
        assert during.pages_used >= served.engine.facts.pages_for(len(prompt) + 1)
        assert during.prompt_tokens - before.prompt_tokens == len(prompt)
        m = metrics(served)  # the snapshot fresh_stats brought
        assert m[contract.REQUESTS_RUNNING] == 1
        assert m[contract.KV_USED_BYTES] == during.pages_used * 16 * during.kv_bytes_per_token > 0
    served.wait_idle()
    # A whole request: exact counts.
    r = served.client.post("/v1/completions", json=greedy(prompt=prompt, max_tokens=8))
    assert r.status_code == 200, r.text
    after = served.wait_idle()
    m = metrics(served)
    assert m[contract.KV_USED_BYTES] == 0 and m[contract.REQUESTS_RUNNING] == 0
    assert m[contract.PROMPT_TOKENS + "_total"] == after.prompt_tokens
    assert m[contract.GENERATION_TOKENS + "_total"] == after.generation_tokens
    assert m[contract.TTFT_SECONDS + "_count"] == before.ttft.cumulative()[-1][1] + 2
    assert after.prompt_tokens - before.prompt_tokens == 2 * len(prompt)


# ---- aborts -----------------------------------------------------------------------------
def test_clients_that_disconnect_free_their_pages_in_the_core(served):
    before = served.wait_idle()
    streams = [served.client.stream("POST", "/v1/completions", json=greedy(
        prompt=f"stream {i}", max_tokens=LONG, stream=True)) for i in range(4)]
    lines = [s.__enter__().iter_lines() for s in streams]
    for stream_lines in lines:
        first_event(stream_lines)
    during = served.engine.fresh_stats()
    assert during.running + during.waiting == 4 and during.pages_used > 0
    assert served.engine.counts() == (4, 0)
    for s in streams:
        s.__exit__(None, None, None)
    after = served.wait_idle()  # every sequence aborted, every page free
    assert after.generation_tokens - before.generation_tokens < 4 * LONG
    deadline = time.monotonic() + 10
    while served.engine.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.engine.counts() == (0, 0)


def test_a_stop_string_ends_the_request_and_frees_its_pages(served):
    whole = served.client.post("/v1/completions", json=greedy(prompt="stop", max_tokens=40))
    text = whole.json()["choices"][0]["text"]
    stop = text[10:12]
    assert len(stop) == 2 and text.find(stop) >= 0
    r = served.client.post("/v1/completions", json=greedy(prompt="stop", max_tokens=40,
                                                          stop=[stop]))
    body = r.json()
    assert body["choices"][0]["text"] == text[:text.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 40
    assert served.wait_idle().pages_used == 0


# ---- drain ------------------------------------------------------------------------------
def test_drain_across_the_split(ckpt):
    s = long_served(ckpt)
    try:
        with s.client.stream("POST", "/v1/completions",
                             json=greedy(prompt="drain", max_tokens=400, stream=True)) as r:
            lines = r.iter_lines()
            first_event(lines)
            status = s.client.post(contract.PATH_DRAIN).json()
            assert status == {"draining": True, "drained": False, "running": 1, "waiting": 0}
            assert metrics(s)[contract.DRAINING] == 1
            refused = s.client.post("/v1/completions", json=greedy(prompt="x"))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            rest = rest_of(lines)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert s.client.get(contract.PATH_DRAIN).json() == {
            "draining": True, "drained": True, "running": 0, "waiting": 0}
        stats = s.wait_idle()
        assert stats.running == stats.waiting == stats.pages_used == 0
    finally:
        s.close()


# ---- a core that dies -------------------------------------------------------------------
def test_a_dead_engine_core_fails_health_and_ends_requests_with_an_error(ckpt):
    s = long_served(ckpt)
    pid = s.engine.proc.pid
    try:
        with s.client.stream("POST", "/v1/completions",
                             json=greedy(prompt="die", max_tokens=LONG, stream=True)) as r:
            lines = r.iter_lines()
            first_event(lines)
            os.kill(pid, signal.SIGSTOP)  # nothing more comes: both requests are in flight
            answer = {}
            waiting = threading.Thread(target=lambda: answer.setdefault("r", s.client.post(
                "/v1/completions", json=greedy(prompt="wait", max_tokens=8))))
            waiting.start()
            deadline = time.monotonic() + 10
            while s.engine.counts()[1] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.engine.counts() == (1, 1)
            os.kill(pid, signal.SIGKILL)
            rest = rest_of(lines)
        # The stream ends with an error event, and no [DONE].
        assert "[DONE]" not in rest
        err = rest[-1]["error"]
        assert err["type"] == "server_error" and "signal SIGKILL" in err["message"]
        waiting.join(30)
        assert answer["r"].status_code == 500
        assert "engine core" in answer["r"].json()["error"]["message"]
        health = s.client.get(contract.PATH_HEALTH)
        assert health.status_code == 500
        assert health.json()["error"]["code"] == "engine_failed"
        assert f"{contract.REASON_RANK_FAILED}: the engine core (rank 0, pid {pid}) exited " \
            "with signal SIGKILL" in health.json()["error"]["message"]
        assert s.client.get(contract.PATH_READY).status_code == 503
        refused = s.client.post("/v1/completions", json=greedy(prompt="x"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
        assert s.engine.counts() == (0, 0)
    finally:
        s.close()


# ---- the command line -------------------------------------------------------------------
class Worker(WorkerProcess):
    """The worker at TP 1 (``WorkerProcess``)."""

    def __init__(self, tmp_path: Path, spec_update=None):
        super().__init__(tmp_path, spec_update=spec_update)

    def core(self) -> int:
        """The pid of the worker's one child: its engine core."""
        (pid,) = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                  if proc_parent(p) == self.proc.pid]
        assert b"kvpilot.worker.core" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return pid


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_worker_is_two_processes_and_a_dead_core_ends_it(tmp_path):
    w = Worker(tmp_path)
    try:
        w.wait_ready()
        core = w.core()
        assert _loads_torch(core) and not _loads_torch(w.proc.pid)
        r = httpx.post(w.url + "/v1/completions", timeout=30, json={
            "model": "tiny-llama", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        os.kill(core, signal.SIGKILL)
        assert w.proc.wait(timeout=60) == 1, w.log.read_text()
        assert w.termination.read_text() == (
            f"{contract.REASON_RANK_FAILED}: the engine core (rank 0, pid {core}) exited with "
            "signal SIGKILL")
    finally:
        w.close()


def test_sigterm_finishes_the_requests_in_flight_and_stops_the_core(tmp_path):
    w = Worker(tmp_path)
    try:
        w.wait_ready()
        core = w.core()
        with httpx.stream("POST", w.url + "/v1/completions", timeout=60, json={
                "model": "tiny-llama", "prompt": "a long answer", "stream": True,
                "max_tokens": 400, "ignore_eos": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            first_event(lines)
            w.proc.send_signal(signal.SIGTERM)  # a pod deleted after its drain
            rest = rest_of(lines)
        assert rest[-1] == "[DONE]"
        assert w.proc.wait(timeout=60) in (0, -signal.SIGTERM), w.log.read_text()
        deadline = time.monotonic() + 20
        while Path(f"/proc/{core}").exists() and time.monotonic() < deadline:
            if "Z" == Path(f"/proc/{core}/stat").read_text().rsplit(")", 1)[1].split()[0]:
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{core}").exists() or \
            Path(f"/proc/{core}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert not w.termination.exists()
    finally:
        w.close()


def test_a_checkpoint_that_disagrees_ends_the_worker_with_the_cores_reason(tmp_path):
    def wrong(raw):
        raw["architecture"]["layers"] = 3

    w = Worker(tmp_path, wrong)
    try:
        assert w.proc.wait(timeout=120) == 1, w.log.read_text()
        line = w.termination.read_text()
        assert line.startswith(f"{contract.REASON_WEIGHTS_MISMATCH}: the checkpoint at "), line
    finally:
        w.close()
