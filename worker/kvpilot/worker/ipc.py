"""What the HTTP server's process and the engine core's process say to each other.

One Unix stream socket joins them (a socketpair the server's process makes; the core
inherits one end), carrying length-prefixed pickles. Both processes are the same
program in the same pod, so pickle is no trust boundary here. Every message is a batch,
so that IPC costs a few system calls per engine step, not per token:

- server -> core: ``CoreStart`` once (what to load), then ``Commands``: the new requests,
  aborts and a stats request gathered since the server last sent, and finally ``stop``.
- core -> server: ``Ready`` once (the ``EngineFacts``), then one ``Step`` per engine step
  with every sequence's new token ids, and now and then an ``EngineStats`` snapshot.

The core sends token ids only: text (detokenization, stop strings) is the server's.
Nothing here imports torch: the server's process never does.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvpilot.worker.scheduler import FinishReason, SamplingParams
from kvpilot.worker.stats import EngineStats

if TYPE_CHECKING:
    from kvpilot.worker.config import WorkerSettings

# The error text of a request the engine refused because its waiting queue was full
# (preempted sequences filled it after the server's check): the server's 429.
QUEUE_FULL = "the waiting queue is full"


@dataclass(frozen=True)
class EngineFacts:
    """What the server needs to know of the engine, sent once when it is ready: the server
    checks requests against these and never reaches into the engine."""

    name: str
    max_model_len: int  # the context SLA: the longest sequence served
    vocab_size: int
    page_size: int
    num_pages: int
    max_num_seqs: int
    device: str
    tensor_parallel: int
    pid: int  # of the engine core's process

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


@dataclass(frozen=True)
class CoreStart:
    """What the core loads: ``settings`` as they are (tests, benchmarks), or the worker's
    command line (``argv``, read with the environment the core inherited), checked
    against the checkpoint as ``python -m kvpilot.worker`` does."""

    argv: list[str] | None = None
    settings: WorkerSettings | None = None
    stats_interval: float = 0.1  # seconds between stats snapshots while busy


@dataclass(frozen=True, slots=True)
class NewRequest:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() of the server's process (one clock per host)


@dataclass(slots=True)
class Commands:
    new: list[NewRequest] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)
    stats_request: int = 0  # > 0: send stats once these commands are applied, tagged so
    stop: bool = False  # finish: close the engine (and its ranks) and exit

    def __bool__(self) -> bool:
        return bool(self.new or self.aborts or self.stats_request or self.stop)


@dataclass(frozen=True)
class Ready:
    facts: EngineFacts
    stats: EngineStats  # the first snapshot, so that /metrics has one from the start


@dataclass(slots=True)
class TokenOutput:
    """One sequence's new tokens from one step; ``finish_reason`` once it ended (ERROR
    with ``error`` when the engine failed on it, or refused it: ``QUEUE_FULL``)."""

    seq_id: int
    token_ids: list[int]
    finish_reason: FinishReason | None
    completion_tokens: int  # tokens generated so far
    error: str | None = None


@dataclass(slots=True)
class Step:
    outputs: list[TokenOutput]
    stats: EngineStats | None = None
    stats_reply: int = 0  # the highest stats_request these stats answer


class Channel:
    """Length-prefixed pickles over a stream socket. ``send`` may be called from several
    threads; ``recv`` from one. Both treat a broken connection as its end."""

    _LENGTH = struct.Struct("<Q")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        """Raises OSError when the other process is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(self._LENGTH.pack(len(data)) + data)

    def recv(self) -> Any:
        """The next message, or None once the other end has closed."""
        head = self._read(self._LENGTH.size)
        if head is None:
            return None
        (n,) = self._LENGTH.unpack(head)
        data = self._read(n)
        return None if data is None else pickle.loads(data)

    def _read(self, n: int) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except OSError:
                return None
            if k == 0:
                return None
            got += k
        return buf

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
