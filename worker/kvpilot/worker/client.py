"""The HTTP server's side of the engine core (``kvpilot.worker.core``): it starts the
core's process, sends it requests and aborts, and turns the token ids it sends back into
each request's text.

Two threads move the bytes, so that the event loop never waits on the socket: a sender
sends what requests and aborts gathered since its last send as one ``Commands``; a
reader receives each step's ``Step``, detokenizes every sequence's new tokens
(incrementally, ``TextStream``), matches stop strings, and hands the step's outputs to
the event loop in one call. A stop string ends a request here: the core is told to
abort it, which frees its pages.

Bounds and state kept here, not in the core: the waiting bound (``max_waiting``
requests sent that have no output yet; 429 beyond, and the core refuses what its own
queue cannot take), draining (503 for new requests; the drain's running and waiting
are this side's requests in flight), and the core's latest ``EngineStats`` (sent every
``stats_interval`` while it is busy and when it goes idle; ``fresh_stats`` asks for one).

A core that exits (killed, out of memory, a rank failed) closes the socket: every
request in flight ends with an error, ``error`` says why (the termination line the core
wrote, else how it exited), and ``on_dead`` is called; the server then fails ``/health``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvpilot.api import contract
from kvpilot.worker.ipc import (
    Channel,
    Commands,
    CoreStart,
    EngineFacts,
    NewRequest,
    Ready,
    Step,
    TokenOutput,
)
from kvpilot.worker.scheduler import FinishReason, Sequence
from kvpilot.worker.stats import EngineStats
from kvpilot.worker.tokenizer import Detokenizer, Tokenizer

log = logging.getLogger("kvpilot.worker")


class QueueFull(Exception):
    """``max_waiting`` requests are waiting for their first token."""


class Draining(Exception):
    """The worker is draining and admits nothing new."""


class EngineFailed(Exception):
    """The engine core failed to load or exited; ``reason`` is a termination reason of
    ``kvpilot.api.contract``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Output:
    """What one request gets from one step: its new text and tokens."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """One request's text from its token ids, a step at a time: incremental
    detokenization, stop strings matched on the text (the stop string itself is not
    sent), and what could still become a stop string held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer | None, seq: Sequence):
        self.detokenizer = Detokenizer(tokenizer, seq.prompt[-4:]) if tokenizer else None
        self.stops = seq.params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.prompt_tokens = seq.num_prompt
        self.completion_tokens = 0
        self.text = ""
        self.emitted = 0  # characters of text already sent

    def feed(self, out: TokenOutput) -> Output:
        reason = out.finish_reason
        if reason is FinishReason.ERROR:
            return Output(self.text[self.emitted:], [], reason, self.prompt_tokens,
                          max(self.completion_tokens, out.completion_tokens), out.error)
        new: list[int] = []
        stopped = False
        for token in out.token_ids:
            new.append(token)
            self.completion_tokens += 1
            if self.detokenizer is None:
                continue
            self.text += self.detokenizer.add(token)
            found = [i for i in (self.text.find(s, max(0, self.emitted - len(s)))
                                 for s in self.stops) if i >= 0]
            if found:  # the text ends before the stop string
                self.text = self.text[:min(found)]
                reason, stopped = FinishReason.STOP, True
                break
        if reason is not None and not stopped and self.detokenizer is not None:
            self.text += self.detokenizer.flush()
        hold = self.hold if self.detokenizer is not None else 0
        upto = len(self.text) if reason is not None else max(self.emitted, len(self.text) - hold)
        text, self.emitted = self.text[self.emitted:upto], upto
        return Output(text, new, reason, self.prompt_tokens, self.completion_tokens)


@dataclass
class _Request:
    text: TextStream
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    waiting: bool = True  # no output yet


def _source_roots() -> list[str]:
    import kvpilot

    return [str(Path(p).parent) for p in kvpilot.__path__]


def _exit_how(code: int) -> str:
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _deliver(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class EngineClient:
    """The engine core's process, as the HTTP server sees it."""

    def __init__(self, start: CoreStart, *, model_dir: str, max_waiting: int,
                 on_dead=None, stop_timeout: float = 60.0):
        self.start_message = start
        self.model_dir = model_dir
        self.max_waiting = max_waiting
        self.on_dead = on_dead  # (reason, message), called once if the core dies
        self.stop_timeout = stop_timeout
        self.facts: EngineFacts | None = None
        self.tokenizer: Tokenizer | None = None
        self.error: EngineFailed | None = None
        self.draining = False
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._waiting = 0
        self._outbox = Commands()
        self._send = threading.Event()
        self._ready = threading.Event()
        self._closing = False
        self._stats: EngineStats | None = None
        self._stats_cond = threading.Condition()
        self._stats_asked = itertools.count(1)
        self._stats_answered = 0
        self._dir = tempfile.mkdtemp(prefix="kvpilot-core-")
        self._channel: Channel | None = None
        self._threads: list[threading.Thread] = []

    # ---- start and stop ---------------------------------------------------------------
    def start(self) -> None:
        """Start the core's process and load the tokenizer meanwhile; ``wait_ready``
        waits for the core."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            _source_roots() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env[contract.ENV_TERMINATION_LOG] = self._termination_file
        level = logging.getLevelName(log.getEffectiveLevel())
        cmd = [sys.executable, "-m", "kvpilot.worker.core", "--fd", str(theirs.fileno()),
               "--log-level", str(level)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env)
        finally:
            theirs.close()
        self._channel = Channel(ours)
        self._channel.send(self.start_message)
        log.info("engine core started (pid %d)", self.proc.pid)
        for target, name in ((self._read, "kvpilot-client-reader"),
                             (self._write, "kvpilot-client-sender")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        try:
            self.tokenizer = Tokenizer(self.model_dir)
        except FileNotFoundError:
            self.tokenizer = None  # token ids only

    @property
    def _termination_file(self) -> str:
        return os.path.join(self._dir, "core.termination")

    def wait_ready(self, timeout: float | None = None) -> EngineFacts:
        """The engine's facts once it is ready; raises ``EngineFailed`` if the core
        exited first, TimeoutError past ``timeout``."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the engine core was not ready within {timeout} s")
        if self.facts is None or self.error is not None:
            raise self.error or EngineFailed(contract.REASON_LOAD_FAILED, "no engine core")
        return self.facts

    @property
    def ready(self) -> bool:
        return self.facts is not None and self.error is None

    def close(self) -> None:
        """Stop the core (it closes the other ranks) and wait for it; kill it past
        ``stop_timeout``."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._outbox.stop = True
        self._send.set()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.error("the engine core (pid %d) did not stop: killed", self.proc.pid)
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._channel is not None:
            self._channel.close()
        for t in self._threads:
            t.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- requests -----------------------------------------------------------------------
    def submit(self, seq: Sequence, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Send ``seq`` to the engine; its ``Output``s go to ``queue`` on ``loop``.
        Raises EngineFailed, Draining or QueueFull."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if self.draining or self._closing:
                raise Draining
            if self._waiting >= self.max_waiting:
                raise QueueFull
            self._requests[seq.seq_id] = _Request(TextStream(self.tokenizer, seq), loop, queue)
            self._waiting += 1
            self._outbox.new.append(NewRequest(seq.seq_id, seq.prompt, seq.params, seq.arrival))
        self._send.set()

    def abort(self, seq_id: int) -> None:
        """Forget the request and have the engine free its pages."""
        with self._lock:
            if self._forget(seq_id) is None:
                return
            self._outbox.aborts.append(seq_id)
        self._send.set()

    def _forget(self, seq_id: int) -> _Request | None:
        """Under ``_lock``."""
        req = self._requests.pop(seq_id, None)
        if req is not None and req.waiting:
            self._waiting -= 1
        return req

    def drain(self) -> None:
        with self._lock:
            self.draining = True

    def counts(self) -> tuple[int, int]:
        """(running, waiting): this worker's requests in flight that have had an output,
        and those that have not."""
        with self._lock:
            return len(self._requests) - self._waiting, self._waiting

    # ---- stats --------------------------------------------------------------------------
    def snapshot(self) -> EngineStats:
        """The engine's latest stats (at most ``stats_interval`` old while it is busy)."""
        with self._stats_cond:
            stats = self._stats
        if stats is None:
            raise RuntimeError("no stats from the engine core yet")
        return dataclasses.replace(stats, draining=self.draining)

    def fresh_stats(self, timeout: float = 30.0) -> EngineStats:
        """Stats taken after everything sent so far was applied (one round trip)."""
        with self._lock:
            asked = next(self._stats_asked)
            self._outbox.stats_request = asked
        self._send.set()
        deadline = time.monotonic() + timeout
        with self._stats_cond:
            while self._stats_answered < asked:
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the engine core sent no stats")
                self._stats_cond.wait(left)
        return self.snapshot()

    # ---- the two threads ----------------------------------------------------------------
    def _write(self) -> None:
        while True:
            self._send.wait()
            with self._lock:
                self._send.clear()
                commands, self._outbox = self._outbox, Commands()
            if commands:
                try:
                    self._channel.send(commands)
                except OSError:
                    return  # the core is gone: the reader says why
            if commands.stop:
                return

    def _read(self) -> None:
        while True:
            message = self._channel.recv()
            if message is None:
                break
            if isinstance(message, Step):
                self._step(message)
            elif isinstance(message, Ready):
                with self._stats_cond:
                    self._stats = message.stats
                self.facts = message.facts
                self._ready.set()
        self._died()

    def _step(self, step: Step) -> None:
        if step.stats is not None:
            with self._stats_cond:
                self._stats = step.stats
                self._stats_answered = max(self._stats_answered, step.stats_reply)
                self._stats_cond.notify_all()
        if not step.outputs:
            return
        with self._lock:
            found = [(o, self._requests.get(o.seq_id)) for o in step.outputs]
        loops: dict[asyncio.AbstractEventLoop, list] = {}
        stopped: list[int] = []
        for o, req in found:
            if req is None:
                continue  # aborted meanwhile
            out = req.text.feed(o)
            loops.setdefault(req.loop, []).append((req.queue, out))
            if out.finished and o.finish_reason is None:
                stopped.append(o.seq_id)  # a stop string: the engine goes on otherwise
        with self._lock:
            for o, req in found:
                if req is None:
                    continue
                if req.waiting and self._requests.get(o.seq_id) is req:
                    req.waiting = False
                    self._waiting -= 1
                if o.finish_reason is not None:
                    self._requests.pop(o.seq_id, None)
            for seq_id in stopped:
                if self._requests.pop(seq_id, None) is not None:
                    self._outbox.aborts.append(seq_id)
        if stopped:
            self._send.set()
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass

    def _died(self) -> None:
        """The socket closed: the core exited (or is exiting). Fail what is in flight."""
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(timeout=10)
        ready = self.facts is not None
        error = self._why(code, ready)
        with self._lock:
            closing = self._closing
            if not closing:
                self.error = error
            requests, self._requests, self._waiting = self._requests, {}, 0
        self._ready.set()
        with self._stats_cond:
            self._stats_cond.notify_all()
        loops: dict[asyncio.AbstractEventLoop, list] = {}
        for req in requests.values():
            out = Output("", [], FinishReason.ERROR, req.text.prompt_tokens,
                         req.text.completion_tokens, error.message)
            loops.setdefault(req.loop, []).append((req.queue, out))
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass
        if closing:
            return
        log.error("%s: %s", error.reason, error.message)
        if self.on_dead is not None:
            self.on_dead(error.reason, error.message)

    def _why(self, code: int | None, ready: bool) -> EngineFailed:
        """The core's own termination line where it wrote one, else how it exited."""
        try:
            line = Path(self._termination_file).read_text().strip()
        except OSError:
            line = ""
        reason, sep, message = line.partition(": ")
        if sep and reason:
            return EngineFailed(reason, message)
        pid = self.proc.pid if self.proc is not None else "?"
        how = "is gone" if code is None else f"exited with {_exit_how(code)}"
        if ready:
            return EngineFailed(contract.REASON_RANK_FAILED,
                                f"the engine core (rank 0, pid {pid}) {how}")
        return EngineFailed(contract.REASON_LOAD_FAILED,
                            f"the engine core (pid {pid}) {how} while loading")
