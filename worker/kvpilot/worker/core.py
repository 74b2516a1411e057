"""The engine core: the process that owns the GPU and only schedules and runs steps.

``python -m kvpilot.worker.core --fd N`` is started by the worker's HTTP server process
(``kvpilot.worker.client``) with one end of a socketpair as descriptor N. It reads a
``CoreStart`` (what to load), builds the engine (at tensorParallel > 1 it is rank 0 and
starts the other ranks), sends ``Ready`` with the ``EngineFacts``, then loops:

    apply the commands that came (new requests, aborts) -> one engine step ->
    send one ``Step`` message: every sequence's new token ids, and a stats snapshot at
    most every ``stats_interval`` while busy, once more on going idle, and on request

A reader thread moves commands from the socket into an inbox, so the engine thread never
waits on the socket while there is work. Tokenizing, detokenizing, stop strings and HTTP
are the server process's; this process holds no Python work of theirs, so nothing of
theirs takes the GIL from a step.

Failure: the core exits rather than serve half-broken. A load that fails, a checkpoint
that disagrees with the Model, a rank that dies or hangs, or an error that escapes a
step writes one termination line (``kvpilot.worker.termination``; the server process
points it at a file of its own and passes the line on) and exits 1. A server process
that goes away closes the socket: the core stops its ranks and exits. SIGINT and SIGTERM
are ignored: the server process stops the core when it stops itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

from kvpilot.api import contract
from kvpilot.worker.engine import Engine, QueueFull
from kvpilot.worker.ipc import (
    QUEUE_FULL,
    Channel,
    Commands,
    CoreStart,
    EngineFacts,
    Ready,
    Step,
    TokenOutput,
)
from kvpilot.worker.scheduler import FinishReason, Sequence

log = logging.getLogger("kvpilot.worker")


class EngineCore:
    """Runs an ``Engine`` against a ``Channel``: commands in, one message per step out."""

    def __init__(self, engine: Engine, channel: Channel, *, stats_interval: float = 0.1):
        self.engine = engine
        self.channel = channel
        self.stats_interval = stats_interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[Commands] = []
        self._closed = False  # the server sent stop, or its end of the socket closed
        self._reader = threading.Thread(target=self._read, name="kvpilot-core-reader",
                                        daemon=True)

    def _read(self) -> None:
        while True:
            message = self.channel.recv()
            with self._lock:
                if message is None or message.stop:
                    self._closed = True
                if message is not None:
                    self._inbox.append(message)
            self._wake.set()
            if message is None or message.stop:
                return

    def run(self) -> None:
        """Until the server says stop or goes away."""
        self._reader.start()
        engine = self.engine
        last_stats = 0.0
        idle_reported = False
        stats_reply = 0
        while True:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                closed = self._closed
            outputs: list[TokenOutput] = []
            aborted = False
            for commands in inbox:
                for r in commands.new:
                    seq = Sequence(r.prompt, r.params, arrival=r.arrival, seq_id=r.seq_id)
                    try:
                        engine.add(seq, detokenize=False)
                    except QueueFull:  # preempted sequences filled the queue meanwhile
                        outputs.append(TokenOutput(seq.seq_id, [], FinishReason.ERROR, 0,
                                                   QUEUE_FULL))
                for seq_id in commands.aborts:
                    aborted |= engine.abort(seq_id)
                stats_reply = max(stats_reply, commands.stats_request)
            if closed:
                return
            if aborted:
                engine._refresh_stats()
            if engine.has_work():
                outputs += [TokenOutput(o.seq_id, o.token_ids, o.finish_reason,
                                        o.completion_tokens, o.error) for o in engine.step()]
            idle = not engine.has_work()
            idle_reported &= idle
            now = time.monotonic()
            step = Step(outputs)
            if (stats_reply or (idle and not idle_reported)
                    or (outputs and now - last_stats >= self.stats_interval)):
                step.stats, step.stats_reply, last_stats = engine.snapshot(), stats_reply, now
                stats_reply = 0
                idle_reported = idle
            if outputs or step.stats is not None:
                try:
                    self.channel.send(step)
                except OSError:  # the server is gone
                    return
            if idle:
                self._wake.wait(timeout=1.0)
                self._wake.clear()


def engine_facts(engine: Engine, name: str, *, max_num_seqs: int, device: str,
                 tensor_parallel: int) -> EngineFacts:
    bm = engine.scheduler.bm
    return EngineFacts(name=name, max_model_len=engine.max_model_len,
                       vocab_size=engine.runner.model.cfg.vocab_size, page_size=bm.page_size,
                       num_pages=bm.num_pages, max_num_seqs=max_num_seqs, device=device,
                       tensor_parallel=tensor_parallel, pid=os.getpid())


def _settings(start: CoreStart):
    """The settings to load, or a termination (reason, message) when the checkpoint
    disagrees with the Model."""
    if start.settings is not None:
        return start.settings, None
    from kvpilot.worker.__main__ import check_checkpoint, parse_args, settings_from

    args = parse_args(start.argv)
    settings = settings_from(args, os.environ)
    if args.spec or os.environ.get(contract.ENV_MODEL_SPEC):  # not one described from it
        return settings, check_checkpoint(args.model, settings.spec, settings.name)
    return settings, None


def serve(channel: Channel) -> int:
    """The core's life on an open channel; the process's exit status."""
    from kvpilot.worker.factory import create_engine
    from kvpilot.worker.termination import write_termination

    start: CoreStart | None = channel.recv()
    if start is None:
        return 0

    def rank_failed(reason: str, message: str) -> None:
        # Called with the other ranks already stopped; the engine thread may be stuck in
        # a collective, so nothing waits for it.
        write_termination(reason, message)
        logging.shutdown()
        os._exit(1)

    try:
        settings, stop = _settings(start)
        if stop is not None:
            write_termination(*stop)
            return 1
        engine = create_engine(settings, on_rank_failure=rank_failed)
    except Exception as err:  # noqa: BLE001 - reported, then the process exits
        log.exception("the model failed to load")
        write_termination(contract.REASON_LOAD_FAILED, f"{type(err).__name__}: {err}")
        return 1
    try:
        facts = engine_facts(engine, settings.name, max_num_seqs=settings.max_num_seqs,
                             device=settings.device, tensor_parallel=settings.tp)
        channel.send(Ready(facts, engine.snapshot()))
        log.info("engine core ready: %s on %s, pid %d", settings.name, settings.device,
                 os.getpid())
        EngineCore(engine, channel, stats_interval=start.stats_interval).run()
    except OSError:
        pass  # the server went away
    except Exception as err:  # noqa: BLE001 - a bug: the replica cannot go on
        log.exception("the engine core failed")
        write_termination(contract.REASON_RANK_FAILED,
                          f"the engine core (rank 0) failed: {type(err).__name__}: {err}")
        engine.runner.close()
        return 1
    engine.runner.close()  # the other ranks of a tensor-parallel replica
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvpilot.worker.core",
                                 description="The engine core of a worker (started by its "
                                             "HTTP server process).")
    ap.add_argument("--fd", type=int, required=True, help="this end of the server's socket")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s core %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=a.fd))
    try:
        return serve(channel)
    finally:
        channel.close()


if __name__ == "__main__":
    # Run as the imported module, not as __main__, so that pickled messages name
    # kvpilot.worker.core's classes as the server's process does.
    from kvpilot.worker import core

    sys.exit(core.main())
