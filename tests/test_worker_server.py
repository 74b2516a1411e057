"""The worker's HTTP server, served for real by uvicorn on a loopback port, over a tiny
random checkpoint on CPU, with its engine core in a process of its own as in a pod:
OpenAI-compatible answers, bad input, 429, drain, metrics, client disconnects; and the
command line as the operator starts it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvpilot.api import contract  # noqa: E402
from kvpilot.api.memory import replica_budget  # noqa: E402
from kvpilot.worker.model import load_config  # noqa: E402
from kvpilot.worker.scheduler import SamplingParams  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.server_helpers import NAME, Served, greedy  # noqa: E402
from tests.worker_helpers import tiny_engine  # noqa: E402

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def served(ckpt):
    s = Served(ckpt)
    yield s
    s.close()


def events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_ready_models(served):
    assert served.client.get(contract.PATH_HEALTH).status_code == 200
    assert served.client.get(contract.PATH_READY).json() == {"status": "ready"}
    models = served.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["max_model_len"] == 256


def test_completion_text_is_the_engines_greedy_output(served, ckpt):
    r = served.client.post("/v1/completions", json=greedy(prompt="Hello world"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    tok = served.engine.tokenizer
    prompt = tok.encode("Hello world")
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 8,
                             "total_tokens": len(prompt) + 8}
    offline = tiny_engine(ckpt).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert choice["text"] == tok.decode(offline.output)


def test_streamed_completion_adds_up_to_the_whole(served):
    whole = served.client.post("/v1/completions", json=greedy(prompt="abc")).json()
    with served.client.stream("POST", "/v1/completions",
                              json=greedy(prompt="abc", stream=True,
                                          stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        evs = events(r)
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert evs[-2]["usage"]["completion_tokens"] == 8


def test_chat_completion_and_its_stream(served):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    body = served.client.post("/v1/chat/completions", json=greedy(messages=msgs)).json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and body["choices"][0]["finish_reason"] == "length"
    prompt = served.engine.tokenizer.encode_chat(msgs)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    with served.client.stream("POST", "/v1/chat/completions",
                              json=greedy(messages=msgs, stream=True)) as r:
        evs = events(r)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs[1:-1])
    assert text == msg["content"]
    assert evs[-2]["choices"][0]["finish_reason"] == "length"


def test_eos_ends_with_stop(served):
    # Sample until the model emits an end token; the tiny model's tokens are random.
    for seed in range(40):
        r = served.client.post("/v1/completions", json={
            "model": NAME, "prompt": "x", "max_tokens": 200, "temperature": 2.0,
            "seed": seed}).json()
        if r["choices"][0]["finish_reason"] == "stop":
            assert r["usage"]["completion_tokens"] < 200
            return
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 200
    pytest.fail("no end token in 40 samples of 200 tokens")


def test_seeded_sampling_repeats(served):
    req = {"model": NAME, "prompt": "seed", "max_tokens": 10, "temperature": 1.0,
           "top_p": 0.9, "top_k": 50, "seed": 7, "ignore_eos": True}
    a = served.client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = served.client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"model": "tiny", "prompt": ', 400, None, None),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None, None),
    (b'[1, 2]', 400, None, None),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model", "model_not_found"),
    (json.dumps({"model": "tiny"}).encode(), 400, "prompt", None),
    (json.dumps({"model": "tiny", "prompt": "x" * 300}).encode(), 400, "prompt",
     "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 300}).encode(), 400,
     "max_tokens", "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens", None),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -5}).encode(), 400, "max_tokens", None),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}).encode(), 400, "temperature", None),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 1e9}).encode(), 400, "temperature", None),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 0}).encode(), 400, "top_p", None),
    (json.dumps({"model": "tiny", "prompt": "x", "top_k": -2}).encode(), 400, "top_k", None),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 3}).encode(), 400, "n", None),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 2}).encode(), 400, "logprobs", None),
    (json.dumps({"model": "tiny", "prompt": [1, 99999]}).encode(), 400, "prompt", None),
    (json.dumps({"model": "tiny", "prompt": []}).encode(), 400, "prompt", None),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(),
     400, "stop", None),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(), 400,
     "temperature", None),
])
def test_bad_input_is_a_4xx_with_an_openai_error_and_the_server_goes_on(served, body, status,
                                                                         param, code):
    r = served.client.post("/v1/completions", content=body,
                           headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert served.client.post("/v1/completions", json=greedy(prompt="ok", max_tokens=2)).status_code == 200


def test_bad_chat_input(served):
    for body in ({"model": NAME, "messages": []},
                 {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": NAME, "messages": [{"role": "user"}]}):
        r = served.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_unknown_path_and_method(served):
    assert served.client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert served.client.get("/v1/completions").status_code == 405


def test_full_waiting_queue_answers_429_with_retry_after(served):
    served.engine.max_waiting = 0
    try:
        r = served.client.post("/v1/completions", json=greedy(prompt="x"))
    finally:
        served.engine.max_waiting = 8
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_client_disconnect_mid_stream_frees_its_pages(served):
    before = served.wait_idle().generation_tokens
    with served.client.stream("POST", "/v1/completions",
                              json=greedy(prompt="go on", max_tokens=240, stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert served.engine.fresh_stats().pages_used > 0
    after = served.wait_idle()  # aborted: nothing runs, no page is held
    assert after.generation_tokens - before < 240


def test_metrics_use_the_contract_names_and_bytes(served):
    served.client.post("/v1/completions", json=greedy(prompt="metrics", max_tokens=4))
    text = served.client.get(contract.PATH_METRICS).text
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    label = (("model", NAME),)
    pages = served.engine.facts.num_pages
    per_token = served.engine.snapshot().kv_bytes_per_token
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert samples[(contract.PAGES_TOTAL, label)] == pages == 256 * 4 // 16
    assert samples[(contract.KV_CAPACITY_TOKENS, label)] == pages * 16
    assert samples[(contract.KV_CAPACITY_BYTES, label)] == pages * 16 * per_token
    assert samples[(contract.KV_BUDGET_BYTES, label)] == replica_budget(_spec_of(served), 1).kv_cache
    assert samples[(contract.GENERATION_TOKENS + "_total", label)] >= 4
    assert samples[(contract.TTFT_SECONDS + "_count", label)] >= 1
    assert samples[(contract.DECODE_STEP_SECONDS + "_count", label)] >= 3
    assert samples[(contract.DECODE_STEP_BYTES, label)] > 0
    assert samples[(contract.DRAINING, label)] == 0
    for name in (contract.KV_USAGE_RATIO, contract.KV_USED_BYTES, contract.KV_USED_TOKENS,
                 contract.PAGES_USED, contract.PAGES_CACHED, contract.REQUESTS_RUNNING,
                 contract.REQUESTS_WAITING, contract.PREEMPTIONS + "_total",
                 contract.PREFIX_CACHE_QUERIES + "_total", contract.PREFIX_CACHE_HITS + "_total",
                 contract.PROMPT_TOKENS + "_total", contract.ITL_SECONDS + "_count"):
        assert (name, label) in samples, name
    vllm = ((contract.VLLM_LABEL_MODEL, NAME),)
    for name in (contract.VLLM_KV_USAGE, contract.VLLM_REQUESTS_RUNNING,
                 contract.VLLM_REQUESTS_WAITING):
        assert (name, vllm) in samples


def _spec_of(served):
    from kvpilot.worker.config import spec_from_checkpoint

    return spec_from_checkpoint(load_config(served.ckpt), params_dtype="fp32",
                                kv_dtype="fp32", max_model_len=256, concurrent=4)


def test_drain_stops_admission_and_reports_drained(ckpt):
    s = Served(ckpt)
    try:
        with s.client.stream("POST", "/v1/completions",
                             json=greedy(prompt="long", max_tokens=60, stream=True)) as r:
            lines = r.iter_lines()
            next(lines)
            status = s.client.post(contract.PATH_DRAIN).json()
            assert status["draining"] and not status["drained"] and status["running"] == 1
            refused = s.client.post("/v1/completions", json=greedy(prompt="x"))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert s.client.get(contract.PATH_READY).status_code == 503
            evs = [line for line in lines if line.startswith("data: ")]
        # The request in flight finished in full.
        assert evs[-1] == "data: [DONE]"
        assert json.loads(evs[-2][6:])["choices"][0]["finish_reason"] == "length"
        s.wait_idle()
        assert s.client.get(contract.PATH_DRAIN).json() == {
            "draining": True, "drained": True, "running": 0, "waiting": 0}
        assert s.client.post(contract.PATH_DRAIN).json()["drained"]  # idempotent
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line_serves_a_tiny_checkpoint_with_the_operators_env(tmp_path):
    model_dir = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"}
    subprocess.run([sys.executable, "-m", "kvpilot.worker.tiny", str(model_dir), "--seed", "1"],
                   check=True, env=env, cwd=ROOT)
    spec = _spec_of_dir(model_dir)
    budget = replica_budget(spec, 1)
    env.update({contract.ENV_MODEL_SPEC: json.dumps(spec.model_dump(by_alias=True, mode="json")),
                contract.ENV_MODEL_NAME: "tiny-llama",
                contract.ENV_HBM_PER_GPU: str(budget.per_gpu),
                contract.ENV_TENSOR_PARALLEL: "1"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.worker", "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + contract.PATH_READY, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={
            "model": "tiny-llama", "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
        metrics = httpx.get(url + contract.PATH_METRICS, timeout=5).text
        values = {s.name: s.value for f in text_string_to_metric_families(metrics)
                  for s in f.samples}
        # The pool holds exactly the SLA's tokens: the budget placement reserved for KV.
        assert values[contract.KV_CAPACITY_TOKENS] == 512 * 2
        assert values[contract.KV_BUDGET_BYTES] == budget.kv_cache
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _spec_of_dir(model_dir):
    from kvpilot.worker.config import spec_from_checkpoint
    from kvpilot.worker.model import load_config

    return spec_from_checkpoint(load_config(model_dir), params_dtype="fp32", kv_dtype="bf16",
                                max_model_len=512, concurrent=2)
