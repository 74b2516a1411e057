"""The worker's HTTP server: OpenAI-compatible completions and chat completions
(streamed as server-sent events or not), ``/v1/models``, and the endpoints of
``kvpilot.api.contract``: health, readiness, Prometheus metrics and drain.

Every request is checked before it reaches the engine; what is wrong gets a 4xx with an
OpenAI-style body, ``{"error": {"message", "type", "param", "code"}}``, and the server
goes on: malformed JSON or UTF-8, lone UTF-16 surrogates, nesting or integers beyond
what the JSON parser takes, fields of the wrong type (no ``"10"`` for 10, no ``true`` for
1), an unknown model, a prompt or ``max_tokens`` beyond the context SLA or the page pool,
out-of-range sampling parameters, stop strings beyond their bound, special-token text in
chat content, features this engine does not have. A full waiting queue answers 429 with
``Retry-After``; a draining worker 503. ``finish_reason`` is ``stop`` (end token or stop
string) or ``length`` (max_tokens or the context limit), never anything for a sequence
that did not end: a sequence the engine failed on ends a stream with an error event and
no ``[DONE]``, or a 500. A client that disconnects has its sequence aborted and its
pages freed.

This process never runs the engine: the engine core is a process of its own
(``kvpilot.worker.core``, the only one that touches a GPU), reached through
``kvpilot.worker.client.EngineClient``, which turns the core's token ids into text. The
server checks requests against the core's ``EngineFacts`` and tokenizes them itself. A core that exits fails ``/health`` (500) and ``/ready`` (503),
ends every request in flight with an error (an error event in a stream, a 500 before
one), and new requests get 503.

Bounds (``ServerSettings``): a body is read up to ``max_body_bytes`` (413 from its
Content-Length, or as soon as a chunked body passes it) within ``body_timeout`` (408);
it is then parsed, validated, templated and tokenized on ``prepare_threads`` threads, at
most ``max_preparing`` requests at once (429 beyond), so the event loop only moves bytes
and ``/health`` answers while a large body is worked on. ``uvicorn_config`` serves the
app with uvicorn's h11 protocol plus what it lacks against idle clients: a connection
that has not sent a whole request head within ``header_timeout`` (from its opening or
from its last response) is closed, and connections beyond ``max_connections`` are
answered 503 and closed at once; ``keep_alive_timeout`` closes idle keep-alive ones; a
response whose client reads nothing for ``write_timeout`` is aborted (a stream's
sequence with it: a client that stops reading holds no pages for long). A
log message repeated within ``log_interval`` is dropped and counted (``RepeatFilter``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import resource
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

from kvpilot import http_bounds
from kvpilot.api import contract
from kvpilot.worker.client import (
    Draining,
    EngineClient,
    EngineFailed,
    Output,
    QueueFull,
)
from kvpilot.worker.ipc import QUEUE_FULL
from kvpilot.worker.metrics import registry_for, render
from kvpilot.worker.scheduler import FinishReason, SamplingParams, Sequence

log = logging.getLogger("kvpilot.worker")

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string: the stream holds back up to this many characters
RETRY_AFTER_SECONDS = 1
# A normalizer may shrink text before it is tokenized (NFC: at most 3 characters to 1).
_NORMALIZER_SHRINK = 4
_MESSAGES_PER_SLICE = 512


def _default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 2))  # the rest of the descriptors for everything else


@dataclass(frozen=True)
class ServerSettings:
    """What one client can hold of the server, and how it treats input. Defaults suit a
    worker behind a gateway; the tests shorten the timeouts."""

    max_body_bytes: int = 8 * 2**20  # a 128K-token prompt as JSON token ids is ~1 MB
    body_timeout: float = 30.0  # seconds to receive a whole body, once the head is in
    header_timeout: float = 10.0  # seconds to a whole request head (new or idle connection)
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open
    # seconds a response may wait on a client that reads nothing before the connection
    # is aborted (a stream's sequence with it, freeing its pages)
    write_timeout: float = 30.0
    # bytes buffered towards one client (transport and socket); None: the OS's own
    write_buffer_bytes: int | None = None
    max_connections: int = field(default_factory=_default_max_connections)
    max_header_bytes: int = 16 * 1024  # a request head beyond this is a 400
    prepare_threads: int = 2  # threads that parse, template and tokenize request bodies
    max_preparing: int = 64  # requests being prepared or waiting for a thread; 429 beyond
    log_interval: float = 10.0  # the same log message at most once per this many seconds
    # Text like "<|eot_id|>" in chat content would become that special token and could
    # forge turn boundaries; refused (400) unless this is set.
    special_tokens_in_chat: bool = False

    def __post_init__(self):
        if self.write_buffer_bytes is not None and self.write_buffer_bytes < 1024:
            raise ValueError(f"write_buffer_bytes must be >= 1024, got {self.write_buffer_bytes}")
        for name in ("max_body_bytes", "keep_alive_timeout", "max_connections",
                     "max_header_bytes", "prepare_threads", "max_preparing"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout", "header_timeout", "write_timeout", "log_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        # ASCII JSON: whatever a client put in the message (its model name) renders.
        return Response(json.dumps(body).encode(), status_code=self.status,
                        headers=self.headers, media_type="application/json")


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


def _engine_gone(err: EngineFailed) -> ApiError:
    return ApiError(503, f"the engine core is gone ({err.reason}: {err.message})",
                    type="service_unavailable", code="engine_failed")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large", headers={"Connection": "close"})


class ClientGone(Exception):
    """The client closed its connection before its body was in."""


# ---- request bodies ---------------------------------------------------------------------
# Strict: a number is a JSON number and a boolean a JSON boolean ("10", 10.0 and true are
# not max_tokens 10); a float field takes an integer.
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

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
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    # Validated as Messages by ``_messages``, a slice at a time.
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = None


_MESSAGE_LIST = TypeAdapter(list[Message])


# ---- worker state -----------------------------------------------------------------------
@dataclass
class WorkerState:
    """What the app serves. ``engine`` (the engine core, as this process sees it) is None
    until the model has loaded; ``load_error`` says why it never will."""

    name: str
    engine: EngineClient | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


# A \uD800..\uDFFF escape: the only way a lone surrogate gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(data: Any) -> str | None:
    """Where (``messages.0.content``) a string of parsed JSON holds a lone UTF-16
    surrogate, which ``\\ud800`` escapes make and no text can hold (the tokenizer and
    UTF-8 refuse it); None when none does. Iterative: any depth the parser took."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, str):
            if _SURROGATE.search(obj):
                return ".".join(map(str, path))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if _SURROGATE.search(key):
                    return ".".join(map(str, path + (key,)))
                stack.append((path + (key,), value))
        elif isinstance(obj, list):
            stack.extend((path + (i,), v) for i, v in enumerate(obj)
                         if isinstance(v, (str, list, dict)))
    return None


def _invalid(loc: tuple, message: str) -> ApiError:
    where = ".".join(str(p) for p in loc)
    return ApiError(400, f"{where}: {message}" if where else message, param=where or None)


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
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # an integer literal of more than 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(data)
        if where is not None:
            raise ApiError(400, f"{where}: a string holds a lone UTF-16 surrogate (an "
                           "unpaired \\ud800-\\udfff escape), which is not text", param=where)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise _invalid(first["loc"], first["msg"]) from None


def _messages(raw: list) -> list[Message]:
    """Chat messages, validated a slice at a time: a body of 100,000 messages takes the
    validator ~0.6 s, all of it holding the GIL unless it is cut into pieces."""
    out: list[Message] = []
    for start in range(0, len(raw), _MESSAGES_PER_SLICE):
        try:
            out += _MESSAGE_LIST.validate_python(raw[start:start + _MESSAGES_PER_SLICE])
        except ValidationError as err:
            first = err.errors()[0]
            index, *rest = first["loc"]
            raise _invalid(("messages", index + start, *rest), first["msg"]) from None
    return out


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
    if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at "
                  f"most {MAX_STOP_CHARS} characters")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                          stop=tuple(stops), ignore_eos=body.ignore_eos)


async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """The body, refused with 413 from its Content-Length or as soon as what came passes
    ``max_body_bytes`` (a chunked body has no length up front), with 408 past
    ``body_timeout``; both close the connection rather than read on. ``ClientGone`` when
    the client leaves before it is all in."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within "
                       f"{settings.body_timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        of = f" of {declared}" if declared else ""
        raise ClientGone(f"after {size}{of} bytes of its body") from None
    return b"".join(chunks)


class Preparer:
    """Runs the slow part of a request (JSON, validation, chat template, tokenizer) on a
    few threads, so that the event loop only moves bytes. At most ``limit`` requests are
    prepared or wait for a thread; beyond that ``run`` raises 429. A slot is freed when
    its work ends, even if the request that queued it has gone."""

    def __init__(self, threads: int, limit: int):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvpilot-prepare")
        self._slots = threading.BoundedSemaphore(limit)

    async def run(self, fn: Callable, *args):
        if not self._slots.acquire(blocking=False):
            raise _queue_full()
        work = self._pool.submit(fn, *args)
        work.add_done_callback(lambda _: self._slots.release())  # done, failed or cancelled
        return await asyncio.wrap_future(work)


def _engine_client(state: WorkerState) -> EngineClient:
    """The engine to send a request to, or the ApiError saying why there is none."""
    engine = state.engine
    if engine is None:
        raise _loading(retry=True)
    if engine.error is not None:
        raise _engine_gone(engine.error)
    if engine.draining:
        raise _draining()
    return engine


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _error_event(out: Output) -> bytes:
    err = _engine_failed(out.error)
    return _sse({"error": {"message": err.message, "type": err.type, "param": None,
                           "code": None}})


async def _unless_disconnected(request: Request, work) -> Any:
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


class CompletionService:
    """Completions and chat completions: a request's body to a sequence (checked,
    templated, tokenized; ``prepare_*`` run on the ``Preparer``'s threads), the sequence
    to the engine, and its outputs back as one JSON body or a stream of events."""

    def __init__(self, state: WorkerState, settings: ServerSettings):
        self.state = state
        self.settings = settings

    # ---- a body to a sequence (a Preparer thread) -------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.state.name:
            raise ApiError(404, f"The model `{name}` does not exist (this worker serves "
                           f"`{self.state.name}`).", param="model", code="model_not_found")

    def prepare(self, body: _Body, prompt: list[int], default_max: int | None) -> Sequence:
        facts = _engine_client(self.state).facts
        limit = facts.max_model_len
        vocab = facts.vocab_size
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
        if facts.pages_for(len(prompt) + max_tokens) > facts.num_pages:
            raise ApiError(400, f"{len(prompt) + max_tokens} tokens exceed this worker's KV "
                           f"cache ({facts.num_pages * facts.page_size} tokens)",
                           param="max_tokens", code="context_length_exceeded")
        params = _sampling(body, max_tokens)
        return Sequence(prompt, params, arrival=time.monotonic())

    @staticmethod
    def check_text(engine: EngineClient, text: str, param: str) -> None:
        """Refuse text that no context can hold before tokenizing it: a token stands for
        at most ``max_token_chars`` characters (after a normalizer, which may shrink)."""
        limit = engine.facts.max_model_len
        if len(text) > limit * engine.tokenizer.max_token_chars * _NORMALIZER_SHRINK:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt has {len(text)} characters, more than {limit} tokens "
                           f"can hold.", param=param, code="context_length_exceeded")

    def prepare_completion(self, raw: bytes) -> tuple[CompletionBody, Sequence]:
        body = _parse(raw, CompletionBody)
        self.check_model(body.model)
        engine = _engine_client(self.state)
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
            self.check_text(engine, p, "prompt")
            # The whole prompt is the client's: its special-token text is parsed as such.
            prompt = engine.tokenizer.encode(p)
        else:
            prompt = list(p)
        return body, self.prepare(body, prompt, default_max=16)

    def prepare_chat(self, raw: bytes) -> tuple[ChatBody, Sequence]:
        body = _parse(raw, ChatBody)
        self.check_model(body.model)
        engine = _engine_client(self.state)
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this worker has no tokenizer", param="messages")
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in _messages(body.messages)]
        if not self.settings.special_tokens_in_chat:
            for i, m in enumerate(messages):
                found = tokenizer.special_token_in(m["content"])
                if found is not None:
                    raise ApiError(400, f"messages[{i}] holds the text of the special token "
                                   f"{found!r}, which would become that token and could "
                                   f"forge the conversation's turns",
                                   param=f"messages.{i}.content",
                                   code="special_token_in_content")
        try:
            text = tokenizer.apply_chat_template(messages)
        except Exception as err:  # noqa: BLE001 - a template may refuse a conversation
            raise ApiError(400, f"the chat template refused these messages: {err}",
                           param="messages") from None
        self.check_text(engine, text, "messages")
        # The template writes the special tokens itself (transformers does the same).
        prompt = tokenizer.encode(text, add_special_tokens=False)
        return body, self.prepare(body, prompt, default_max=None)

    # ---- a sequence to its answer (the event loop) ------------------------------------
    async def outputs(self, seq: Sequence) -> AsyncIterator[Output]:
        """The engine's outputs for one sequence; aborts it if the consumer stops early."""
        queue: asyncio.Queue[Output] = asyncio.Queue()
        engine = _engine_client(self.state)
        try:
            engine.submit(seq, asyncio.get_running_loop(), queue)
        except QueueFull:
            raise _queue_full() from None
        except Draining:
            raise _draining() from None
        except EngineFailed as err:
            raise _engine_gone(err) from None
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                engine.abort(seq.seq_id)

    @staticmethod
    async def first(gen: AsyncIterator[Output]) -> Output:
        """The first output, so that errors before any token are HTTP errors."""
        out = await gen.__anext__()
        if out.finish_reason is FinishReason.ERROR:
            await gen.aclose()
            if out.error == QUEUE_FULL:
                raise _queue_full()
            raise _engine_failed(out.error)
        return out

    async def respond(self, request: Request, body: _Body, seq: Sequence, *, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        name = self.state.name
        gen = self.outputs(seq)
        if not body.stream:
            return await _unless_disconnected(request, self._collect(gen, rid, created, chat))

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        head = await _unless_disconnected(request, self.first(gen))
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
            return _sse({"id": rid, "object": chunk_obj, "created": created, "model": name,
                         "choices": [choice]})

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                out = head
                while True:
                    if out.finish_reason is FinishReason.ERROR:
                        yield _error_event(out)
                        return
                    if out.text or out.finished:
                        yield chunk(out.text, out.finish_reason)
                    if out.finished:
                        break
                    out = await gen.__anext__()
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created,
                                "model": name, "choices": [], "usage": _usage(out)})
                yield b"data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _collect(self, gen: AsyncIterator[Output], rid: str, created: int,
                       chat: bool) -> dict:
        """A whole (non-streamed) answer."""
        out = await self.first(gen)
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
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": self.state.name, "choices": [choice],
                "usage": _usage(out)}


def _error_handlers(app: FastAPI) -> None:
    """Every error a client can meet as an OpenAI-style JSON body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, err: ClientGone):
        # Ordinary on a bad network; one line, no traceback (nobody reads the answer).
        client = request.client
        log.info("%s went away %s", f"{client.host}:{client.port}" if client else "a client",
                 err)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception):
        # A bug: a JSON 500 for the client; the server logs the traceback.
        return ApiError(500, f"internal error ({type(err).__name__})",
                        type="server_error").response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _):
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}",
                        code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, _):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()


def _contract_routes(app: FastAPI, state: WorkerState) -> None:
    """Health, readiness, metrics, drain (``kvpilot.api.contract``) and ``/v1/models``."""
    registry = {}

    @app.get(contract.PATH_HEALTH)
    async def health():
        if state.load_error:
            raise ApiError(500, f"the model failed to load: {state.load_error}",
                           type="server_error")
        if state.engine is not None and state.engine.error is not None:
            err = state.engine.error
            raise ApiError(500, f"the engine core is gone ({err.reason}: {err.message})",
                           type="server_error", code="engine_failed")
        return {"status": "ok"}

    @app.get(contract.PATH_READY)
    async def ready():
        if state.engine is None:
            raise _loading()
        if state.engine.error is not None:
            raise _engine_gone(state.engine.error)
        if state.engine.draining:
            raise ApiError(503, "draining", type="service_unavailable", code="draining")
        return {"status": "ready"}

    @app.get(contract.PATH_METRICS)
    async def metrics():
        if state.engine is None:
            raise _loading()
        if "r" not in registry:
            registry["r"] = registry_for(state.engine.snapshot)
        return Response(render(registry["r"]),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def drain_status() -> dict:
        if state.engine is None:
            return {"draining": False, "drained": False, "running": 0, "waiting": 0}
        running, waiting = state.engine.counts()
        draining = state.engine.draining
        return {"draining": draining, "drained": draining and running == 0 and waiting == 0,
                "running": running, "waiting": waiting}

    @app.post(contract.PATH_DRAIN)
    async def drain():
        if state.engine is None:
            raise _loading()
        state.engine.drain()
        return drain_status()

    @app.get(contract.PATH_DRAIN)
    async def drain_progress():
        return drain_status()

    @app.get("/v1/models")
    async def models():
        data = {"id": state.name, "object": "model", "created": state.created,
                "owned_by": "kvpilot"}
        if state.engine is not None:
            data["max_model_len"] = state.engine.facts.max_model_len
        return {"object": "list", "data": [data]}

    @app.get("/")
    async def root():
        return PlainTextResponse(f"kvpilot worker serving {state.name}\n")


def create_app(state: WorkerState, settings: ServerSettings | None = None) -> FastAPI:
    """The worker's HTTP API: error handlers, the contract's routes, and completions
    through a ``CompletionService`` whose bodies are prepared off the event loop."""
    settings = settings or ServerSettings()
    app = FastAPI(title="kvpilot worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = state
    app.state.settings = settings
    _error_handlers(app)
    _contract_routes(app, state)
    service = CompletionService(state, settings)
    preparer = Preparer(settings.prepare_threads, settings.max_preparing)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, settings)
        body, seq = await preparer.run(service.prepare_completion, raw)
        return await service.respond(request, body, seq, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, settings)
        body, seq = await preparer.run(service.prepare_chat, raw)
        return await service.respond(request, body, seq, chat=True)

    return app


# ---- serving ----------------------------------------------------------------------------
class RepeatFilter(logging.Filter):
    """Lets one record of a kind (logger, level, message format) through per ``interval``
    seconds; the next one let through says how many were dropped meanwhile. A flood of one
    error (a client repeating a bad request, accept() out of descriptors) then costs a
    line per interval, not the disk."""

    _MAX_KINDS = 1024  # kinds are format strings, few; a bound all the same

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple, list] = {}  # kind -> [when let through, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.interval:
                seen[1] += 1
                return False
            dropped = seen[1] if seen is not None else 0
            if seen is None and len(self._seen) >= self._MAX_KINDS:
                self._seen.clear()
            self._seen[kind] = [now, 0]
        if dropped:
            record.msg = (f"{record.msg} ({dropped} more like it in the last "
                          f"{self.interval:g} s were not logged)")
        return True


# What the server logs: the worker, uvicorn's protocol errors, asyncio's accept() errors.
REPEAT_LIMITED_LOGGERS = ("kvpilot.worker", "uvicorn.error", "asyncio")


def limit_repeated_logs(interval: float) -> None:
    for name in REPEAT_LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(RepeatFilter(interval))


def bounded_protocol(settings: ServerSettings) -> type:
    """uvicorn's h11 protocol bounded by ``settings`` (``kvpilot.http_bounds``)."""
    return http_bounds.bounded_protocol(
        max_connections=settings.max_connections, header_timeout=settings.header_timeout,
        refusal=http_bounds.too_many_connections("this worker", RETRY_AFTER_SECONDS), log=log,
        write_timeout=settings.write_timeout, write_buffer=settings.write_buffer_bytes)


def uvicorn_config(app: FastAPI, *, host: str, port: int, log_level: str | int = "info"):
    """How to serve ``app`` with uvicorn, bounded by the settings it was created with;
    also limits repeated log messages (after uvicorn has configured logging)."""
    import uvicorn

    settings: ServerSettings = app.state.settings
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="off", http=bounded_protocol(settings),
                            timeout_keep_alive=settings.keep_alive_timeout,
                            h11_max_incomplete_event_size=settings.max_header_bytes)
    limit_repeated_logs(settings.log_interval)
    return config
