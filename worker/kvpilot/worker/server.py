"""The worker's HTTP server: OpenAI-compatible completions and chat completions
(streamed as server-sent events or not), ``/v1/models``, and the endpoints of
``kvpilot.api.contract``: health, readiness, Prometheus metrics and drain.

Every request is checked before it reaches the engine; what is wrong gets a 4xx with an
OpenAI-style body, ``{"error": {"message", "type", "param", "code"}}``, and the server
goes on: malformed JSON or UTF-8, an unknown model, a prompt or ``max_tokens`` beyond
the context SLA or the page pool, out-of-range sampling parameters, features this engine
does not have. A full waiting queue answers 429 with ``Retry-After``; a draining worker
503. ``finish_reason`` is ``stop`` (end token or stop string) or ``length`` (max_tokens
or the context limit), never anything for a sequence that did not end: a sequence whose
batch failed ends a stream with an error event and no ``[DONE]``, or a 500. A client
that disconnects has its sequence aborted and its pages freed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvpilot.api import contract
from kvpilot.worker.engine import QUEUE_FULL, Draining, EngineLoop, Output, QueueFull
from kvpilot.worker.metrics import registry_for, render
from kvpilot.worker.scheduler import FinishReason, SamplingParams, Sequence

log = logging.getLogger("kvpilot.worker")

MAX_STOP_STRINGS = 4
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _loading(retry: bool = False) -> ApiError:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if retry else None
    return ApiError(503, "the model is still loading", type="service_unavailable",
                    headers=headers)


def _draining() -> ApiError:
    return ApiError(503, "this worker is draining and takes no new requests",
                    type="service_unavailable", code="draining")


def _queue_full() -> ApiError:
    return ApiError(429, "too many requests are waiting; retry later",
                    type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _engine_failed(error: str | None) -> ApiError:
    return ApiError(500, f"the engine failed on this request: {error}", type="server_error")


# ---- request bodies ---------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    best_of: int | None = None


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


# ---- worker state -----------------------------------------------------------------------
@dataclass
class WorkerState:
    """What the app serves. ``loop`` is None until the model has loaded."""

    name: str
    loop: EngineLoop | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine(self):
        return self.loop.engine if self.loop else None


def _parse(raw: bytes, cls: type[_Body]) -> _Body:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 ({err.reason} at byte "
                       f"{err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err.msg} (line "
                       f"{err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def _sampling(body: _Body, max_tokens: int) -> SamplingParams:
    def bad(param: str, message: str) -> ApiError:
        return ApiError(400, message, param=param)

    if not (math.isfinite(body.temperature) and 0.0 <= body.temperature <= 2.0):
        raise bad("temperature", f"temperature must be between 0 and 2, got {body.temperature}")
    if not (math.isfinite(body.top_p) and 0.0 < body.top_p <= 1.0):
        raise bad("top_p", f"top_p must be in (0, 1], got {body.top_p}")
    if body.top_k < -1:
        raise bad("top_k", f"top_k must be -1 or 0 (all tokens) or positive, got {body.top_k}")
    if body.n != 1:
        raise bad("n", "only n = 1 is supported")
    if body.best_of not in (None, 1):
        raise bad("best_of", "only best_of = 1 is supported")
    if body.logprobs not in (None, False, 0):
        raise bad("logprobs", "logprobs are not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0.0:
            raise bad(name, f"{name} is not supported (only 0)")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise bad("seed", "seed must be in 0..2**63-1")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise bad("stop", f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                          stop=tuple(stops), ignore_eos=body.ignore_eos)


def create_app(state: WorkerState) -> FastAPI:
    app = FastAPI(title="kvpilot worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = state
    registry = {}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _):
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}",
                        code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, _):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    def engine_loop() -> EngineLoop:
        if state.loop is None:
            raise _loading(retry=True)
        if state.loop.draining:
            raise _draining()
        return state.loop

    def check_model(name: str) -> None:
        if name != state.name:
            raise ApiError(404, f"The model `{name}` does not exist (this worker serves "
                           f"`{state.name}`).", param="model", code="model_not_found")

    # ---- contract endpoints -------------------------------------------------------------
    @app.get(contract.PATH_HEALTH)
    async def health():
        if state.load_error:
            raise ApiError(500, f"the model failed to load: {state.load_error}",
                           type="server_error")
        return {"status": "ok"}

    @app.get(contract.PATH_READY)
    async def ready():
        if state.loop is None:
            raise _loading()
        if state.loop.draining:
            raise ApiError(503, "draining", type="service_unavailable", code="draining")
        return {"status": "ready"}

    @app.get(contract.PATH_METRICS)
    async def metrics():
        if state.loop is None:
            raise _loading()
        if "r" not in registry:
            registry["r"] = registry_for(state.loop.engine.snapshot)
        return Response(render(registry["r"]),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def drain_status() -> dict:
        if state.loop is None:
            return {"draining": False, "drained": False, "running": 0, "waiting": 0}
        running, waiting = state.loop.counts()
        draining = state.loop.draining
        return {"draining": draining, "drained": draining and running == 0 and waiting == 0,
                "running": running, "waiting": waiting}

    @app.post(contract.PATH_DRAIN)
    async def drain():
        if state.loop is None:
            raise _loading()
        state.loop.drain()
        return drain_status()

    @app.get(contract.PATH_DRAIN)
    async def drain_progress():
        return drain_status()

    @app.get("/v1/models")
    async def models():
        data = {"id": state.name, "object": "model", "created": state.created,
                "owned_by": "kvpilot"}
        if state.engine is not None:
            data["max_model_len"] = state.engine.max_model_len
        return {"object": "list", "data": [data]}

    # ---- generation ---------------------------------------------------------------------
    def prepare(body: _Body, prompt: list[int], default_max: int | None) -> Sequence:
        engine = engine_loop().engine
        limit = engine.max_model_len
        vocab = engine.runner.model.cfg.vocab_size
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        if len(prompt) >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt has {len(prompt)} (room must be left for one output "
                           f"token).", param="prompt", code="context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max
        if max_tokens is None:
            max_tokens = limit - len(prompt)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if len(prompt) + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; "
                           f"{len(prompt)} in the prompt + {max_tokens} max_tokens is "
                           f"{len(prompt) + max_tokens}.", param="max_tokens",
                           code="context_length_exceeded")
        bm = engine.scheduler.bm
        if bm.pages_for(len(prompt) + max_tokens) > bm.num_pages:
            raise ApiError(400, f"{len(prompt) + max_tokens} tokens exceed this worker's KV "
                           f"cache ({bm.num_pages * bm.page_size} tokens)", param="max_tokens",
                           code="context_length_exceeded")
        params = _sampling(body, max_tokens)
        return Sequence(prompt, params, arrival=time.monotonic())

    async def outputs(seq: Sequence) -> AsyncIterator[Output]:
        """The engine's outputs for one sequence; aborts it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            engine_loop().submit(seq, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except QueueFull:
            raise _queue_full() from None
        except Draining:
            raise _draining() from None
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                state.loop.abort(seq.seq_id)

    async def first(gen: AsyncIterator[Output]) -> Output:
        """The first output, so that errors before any token are HTTP errors."""
        out = await gen.__anext__()
        if out.finish_reason is FinishReason.ERROR:
            await gen.aclose()
            if out.error == QUEUE_FULL:
                raise _queue_full()
            raise _engine_failed(out.error)
        return out

    async def unless_disconnected(request: Request, work) -> Any:
        """Await ``work``; cancel it (aborting its sequence) if the client goes away."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with suppress(asyncio.CancelledError, ApiError):
                    await task
                return Response(status_code=499)

    def sse(obj: dict) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def usage(out: Output) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def error_event(out: Output) -> bytes:
        err = _engine_failed(out.error)
        return sse({"error": {"message": err.message, "type": err.type, "param": None,
                              "code": None}})

    async def respond(request: Request, body: _Body, seq: Sequence, *, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        gen = outputs(seq)

        if not body.stream:
            async def collect():
                out = await first(gen)
                text = out.text
                async for more in gen:
                    if more.finish_reason is FinishReason.ERROR:
                        raise _engine_failed(more.error)
                    text += more.text
                    out = more
                choice = {"index": 0, "finish_reason": out.finish_reason.value, "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                return {"id": rid, "object": obj, "created": created, "model": state.name,
                        "choices": [choice], "usage": usage(out)}

            return await unless_disconnected(request, collect())

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        head = await unless_disconnected(request, first(gen))
        if isinstance(head, Response):
            return head
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: FinishReason | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": reason.value if reason else None}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": reason.value if reason else None}
            return sse({"id": rid, "object": chunk_obj, "created": created,
                        "model": state.name, "choices": [choice]})

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                out = head
                while True:
                    if out.finish_reason is FinishReason.ERROR:
                        yield error_event(out)
                        return
                    if out.text or out.finished:
                        yield chunk(out.text, out.finish_reason)
                    if out.finished:
                        break
                    out = await gen.__anext__()
                if include_usage:
                    yield sse({"id": rid, "object": chunk_obj, "created": created,
                               "model": state.name, "choices": [], "usage": usage(out)})
                yield b"data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(await request.body(), CompletionBody)
        check_model(body.model)
        engine = engine_loop().engine
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, str):
            if engine.tokenizer is None:
                raise ApiError(400, "this worker has no tokenizer: send token ids", param="prompt")
            prompt = engine.tokenizer.encode(p)
        else:
            prompt = list(p)
        seq = prepare(body, prompt, default_max=16)
        return await respond(request, body, seq, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(await request.body(), ChatBody)
        check_model(body.model)
        engine = engine_loop().engine
        if engine.tokenizer is None:
            raise ApiError(400, "this worker has no tokenizer", param="messages")
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = engine.tokenizer.encode_chat(messages)
        except Exception as err:  # noqa: BLE001 - a template may refuse a conversation
            raise ApiError(400, f"the chat template refused these messages: {err}",
                           param="messages") from None
        seq = prepare(body, prompt, default_max=None)
        return await respond(request, body, seq, chat=True)

    @app.get("/")
    async def root():
        return PlainTextResponse(f"kvpilot worker serving {state.name}\n")

    return app
