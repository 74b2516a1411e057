"""A tensor-parallel replica: one process per GPU, rank 0 being the worker itself.

Start-up
    Rank 0 (the worker process: HTTP server, engine, scheduler, block manager) sizes the
    page pool, opens a ``TCPStore`` on loopback and starts ranks 1..tp-1 as its child
    processes (``python -m kvpilot.worker.parallel``), telling each on its stdin what to
    build (``RankSpec``: the checkpoint, dtypes, the pool's page count). All ranks join
    one torch.distributed process group (NCCL on GPUs, gloo on CPU; rank r uses cuda:r of
    the GPUs the pod sees), load only their slices of the checkpoint
    (``model.load_weights(..., part)``), and wait in the store until every rank has
    loaded: shards load at different speeds, and the first collective must not time out
    on that. Then each allocates its pool and captures its decode graphs (their
    collectives keep the ranks in step) and says it is ready.

Steps
    Rank 0's runner writes each step's inputs (``runner.PrefillInputs`` /
    ``DecodeInputs``) to every child's stdin, one length-prefixed pickle, then runs its
    own shard; a child reads a step, runs it, reads the next. A pipe rather than a
    broadcast collective: an idle replica waits for its next step as long as there is no
    traffic, and a collective waiting that long would trip the timeout that catches a
    hung rank; and a pipe ends (EOF) when rank 0 dies, so its children leave too.

Failure
    The replica fails fast rather than hang. Rank 0 watches its children (a thread polls
    them every 0.1 s) and every step (one that has not finished within ``timeout_s``
    means a rank hangs); the process group's collectives time out after ``timeout_s``
    too, and any error in a step after its inputs went out fails the replica, since the
    other ranks would wait for this one in a collective. Failing kills the other ranks
    and calls ``on_failure(reason, message)``: the worker writes its termination message
    (``RankFailed``, or ``LoadFailed`` before the replica was ready, with the rank's own
    last error line) and exits non-zero. A child that fails writes that line to a file of
    its own and exits non-zero; one whose stdin ends (rank 0 is gone) exits.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

from kvpilot.api import contract
from kvpilot.api.support import WORKER_MAX_TENSOR_PARALLEL
from kvpilot.worker.block_manager import BlockManager
from kvpilot.worker.model import (
    DTYPES,
    Llama,
    LlamaConfig,
    Partition,
    load_config,
    load_weights,
    random_weights,
)
from kvpilot.worker.runner import ModelRunner

log = logging.getLogger("kvpilot.worker")

# Diagnostics only: "gloo" runs a replica on GPUs without NCCL (eager, no CUDA graphs),
# and then ranks may share a GPU.
ENV_BACKEND = "KVPILOT_TP_BACKEND"
POLL_S = 0.1

# Rank 0's handler of a failed replica: (termination reason, message).
FailureHandler = Callable[[str, str], None]


class RankFailed(RuntimeError):
    """A rank of this replica died, hung, or fell out of step with the others."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank of a replica builds: its shard of the model and a page pool of
    ``num_pages`` pages (the same count on every rank, each holding its KV heads)."""

    tp: int
    device: str  # "cpu" or "cuda"
    dtype: str  # weights and activations: fp32, bf16, fp16
    kv_dtype: str
    page_size: int
    num_pages: list[int]  # of each KV group's pool
    max_model_len: int
    max_num_seqs: int
    cuda_graphs: bool = True
    timeout_s: float = 120.0  # a collective or a step longer than this fails the replica
    load_timeout_s: float = 1800.0  # every rank loaded its shard within this
    model_dir: str | None = None
    random_config: LlamaConfig | None = None  # random weights of this shape (benchmarks)
    seed: int = 0

    @property
    def backend(self) -> str:
        return os.environ.get(ENV_BACKEND) or ("nccl" if self.device == "cuda" else "gloo")

    @property
    def graphs(self) -> bool:
        return self.cuda_graphs and self.device == "cuda" and self.backend == "nccl"


def rank_device(spec: RankSpec, rank: int) -> torch.device:
    if spec.device == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if spec.backend == "nccl" and count < spec.tp:
        raise ValueError(f"tensorParallel {spec.tp} needs {spec.tp} GPUs, {count} visible")
    return torch.device("cuda", rank % count)


class Comm:
    """The collectives of a tensor-parallel model, over the default process group.
    ``staged``: GPU tensors go through host copies (gloo on GPUs, diagnostics only)."""

    def __init__(self, size: int, staged: bool = False):
        self.size = size
        self.staged = staged

    def all_reduce_(self, x: torch.Tensor) -> None:
        if self.staged:
            host = x.cpu()
            dist.all_reduce(host)
            x.copy_(host)
        else:
            dist.all_reduce(x)

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, cols]`` of each rank -> ``[rows, size x cols]``, rank 0's columns first."""
        rows, cols = x.shape
        src = x.cpu() if self.staged else x.contiguous()
        out = src.new_empty(self.size * rows, cols)
        dist.all_gather_into_tensor(out, src)
        out = out.to(x.device)
        return out.view(self.size, rows, cols).transpose(0, 1).reshape(rows, self.size * cols)


def join_group(spec: RankSpec, store: dist.Store, rank: int, device: torch.device) -> None:
    kw = {"device_id": device} if spec.backend == "nccl" else {}
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.tp,
                            timeout=datetime.timedelta(seconds=spec.timeout_s), **kw)


def load_shard(spec: RankSpec, rank: int, device: torch.device) -> Llama:
    """This rank's shard of the model: only its slices of the checkpoint are read."""
    dtype = DTYPES[spec.dtype]
    if spec.random_config is not None:
        cfg = spec.random_config
        part = Partition.of(cfg, rank, spec.tp)
        weights = random_weights(cfg, device, dtype, seed=spec.seed, part=part)
    else:
        cfg = load_config(spec.model_dir)
        part = Partition.of(cfg, rank, spec.tp)
        weights = load_weights(spec.model_dir, cfg, device, dtype, part)
    comm = Comm(spec.tp, staged=device.type == "cuda" and spec.backend == "gloo")
    return Llama(cfg, weights, max_positions=spec.max_model_len, part=part, comm=comm)


def shard_runner(spec: RankSpec, model: Llama, block_manager: BlockManager | None = None,
                 followers: Followers | None = None, debug_checks: bool = False) -> ModelRunner:
    return ModelRunner(model, block_manager, kv_dtype=spec.kv_dtype,
                       max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
                       cuda_graphs=spec.graphs, debug_checks=debug_checks,
                       followers=followers, num_pages=spec.num_pages, page_size=spec.page_size)


# ---- the step pipe -------------------------------------------------------------------
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class Stop:
    """The last message to a child: leave the process group and exit."""


def write_message(f: BinaryIO, data: bytes) -> None:
    f.write(_LENGTH.pack(len(data)))
    f.write(data)
    f.flush()


def read_message(f: BinaryIO):
    """The next message, or None at the end of the pipe."""
    head = f.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _wait_keys(store: dist.Store, keys: list[str], timeout_s: float, what: str,
               alive: Callable[[], None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        alive()
        if time.monotonic() > deadline:
            raise RankFailed(f"not every rank {what} within {timeout_s:g} s")
        time.sleep(POLL_S / 2)


def _source_roots() -> list[str]:
    import kvpilot

    return [str(Path(p).parent) for p in kvpilot.__path__]


# ---- rank 0 --------------------------------------------------------------------------
class Followers:
    """Ranks 1..tp-1 of this replica, as rank 0 sees them: child processes, their step
    pipes, and the thread that watches them."""

    def __init__(self, spec: RankSpec, on_failure: FailureHandler | None = None):
        self.spec = spec
        self.on_failure = on_failure
        self.error: str | None = None
        self.ready = False  # every rank loaded and built its runner
        self._lock = threading.Lock()
        self._closing = False
        self._step_since: float | None = None
        self._dir = tempfile.mkdtemp(prefix="kvpilot-ranks-")
        self.store = dist.TCPStore("127.0.0.1", 0, spec.tp, is_master=True,
                                   timeout=datetime.timedelta(seconds=spec.load_timeout_s),
                                   wait_for_workers=False)
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, spec.tp):
                self.procs.append(self._spawn(rank))
        except BaseException:
            self._kill()
            raise
        self._watcher = threading.Thread(target=self._watch, name="kvpilot-ranks", daemon=True)
        self._watcher.start()

    def _error_file(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.error")

    def _spawn(self, rank: int) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            _source_roots() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env[contract.ENV_TERMINATION_LOG] = self._error_file(rank)
        level = logging.getLevelName(logging.getLogger("kvpilot.worker").getEffectiveLevel())
        cmd = [sys.executable, "-m", "kvpilot.worker.parallel", "--rank", str(rank),
               "--store", f"127.0.0.1:{self.store.port}", "--log-level", str(level)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
        write_message(proc.stdin, pickle.dumps(self.spec))
        log.info("tensor parallel: rank %d of %d started (pid %d)", rank, self.spec.tp, proc.pid)
        return proc

    # ---- failure ----------------------------------------------------------------------
    def _exit_message(self, rank: int, proc: subprocess.Popen) -> str:
        code = proc.returncode
        try:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        except ValueError:
            how = f"signal {-code}"
        stage = "" if self.ready else " while loading"
        try:  # the rank's own termination line, without its reason
            line = Path(self._error_file(rank)).read_text().strip()
            line = line.split(": ", 1)[-1] if line.startswith(contract.REASON_RANK_FAILED) else line
        except OSError:
            line = ""
        return (f"rank {rank} of {self.spec.tp} (pid {proc.pid}) exited with {how}{stage}"
                + (f": {line}" if line else ""))

    def _exited(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return self._exit_message(rank, proc)
        return None

    def _watch(self) -> None:
        while not self._closing and self.error is None:
            message = self._exited()
            since = self._step_since
            if message is None and since is not None and \
                    time.monotonic() - since > self.spec.timeout_s:
                message = (f"a step has not finished within {self.spec.timeout_s:g} s: a rank "
                           "hangs (or its GPU does)")
            if message is not None:
                self.fail(message)
                return
            time.sleep(POLL_S)

    def fail(self, message: str) -> None:
        """Fail the replica (once): stop every other rank, then tell ``on_failure``."""
        with self._lock:
            if self.error is not None or self._closing:
                return
            self.error = message
        reason = contract.REASON_RANK_FAILED if self.ready else contract.REASON_LOAD_FAILED
        log.error("tensor-parallel replica failed: %s", message)
        self._kill()
        if self.on_failure is not None:
            self.on_failure(reason, message)

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("rank pid %d did not exit after SIGKILL", proc.pid)

    def check(self) -> None:
        if self.error is not None:
            raise RankFailed(self.error)

    def _diagnose(self, err: BaseException) -> str:
        """Why a step failed: a rank that exited says it best (a collective with a dead
        peer fails at once, before the watcher sees the exit)."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            message = self._exited()
            if message is not None:
                return message
            time.sleep(POLL_S / 2)
        return (f"a step failed on rank 0 after its inputs went to the other ranks: "
                f"{type(err).__name__}: {err}")

    # ---- steps ------------------------------------------------------------------------
    @contextmanager
    def step(self):
        """Around one step: timed by the watcher; any error fails the replica."""
        self.check()
        self._step_since = time.monotonic()
        try:
            yield
        except Exception as err:
            self.fail(self._diagnose(err))
            raise RankFailed(self.error or str(err)) from err
        finally:
            self._step_since = None

    def send(self, inputs) -> None:
        data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, proc in enumerate(self.procs, start=1):
            try:
                write_message(proc.stdin, data)
            except OSError as err:
                raise RankFailed(f"rank {rank}'s step pipe is closed ({err})") from err

    # ---- start and stop ---------------------------------------------------------------
    def wait_for(self, what: str) -> None:
        """Until every rank has set ``what/<rank>`` in the store, or one failed."""
        keys = [f"{what}/{r}" for r in range(self.spec.tp)]
        _wait_keys(self.store, keys, self.spec.load_timeout_s, what, self.check)

    def close(self) -> None:
        """Stop the children (a Stop message, then SIGKILL after 10 s) and leave the group."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for proc in self.procs:
            try:
                write_message(proc.stdin, pickle.dumps(Stop()))
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._dir, ignore_errors=True)


def start_replica(spec: RankSpec, block_manager: BlockManager, *, debug_checks: bool = False,
                  on_failure: FailureHandler | None = None) -> ModelRunner:
    """Rank 0 of a tensor-parallel replica: start the other ranks, load this rank's shard,
    and return its runner (the engine's), once every rank is ready."""
    if not 2 <= spec.tp <= WORKER_MAX_TENSOR_PARALLEL:
        raise ValueError(f"tensorParallel {spec.tp}: a replica runs on 2.."
                         f"{WORKER_MAX_TENSOR_PARALLEL} processes")
    device = rank_device(spec, 0)
    followers = Followers(spec, on_failure)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join_group(spec, followers.store, 0, device)
        model = load_shard(spec, 0, device)
        followers.store.set("loaded/0", "1")
        followers.wait_for("loaded")
        # Not timed as a step: capturing many graphs may take longer than one step may;
        # a rank that dies meanwhile is seen by the watcher, one that hangs by the
        # collectives' timeout.
        runner = shard_runner(spec, model, block_manager, followers, debug_checks)
        followers.store.set("ready/0", "1")
        followers.wait_for("ready")
    except BaseException:
        followers.close()
        raise
    followers.ready = True
    log.info("tensor parallel: %d ranks ready (%s)", spec.tp, spec.backend)
    return runner


# ---- ranks 1..tp-1 -------------------------------------------------------------------
def run_follower(spec: RankSpec, rank: int, host: str, port: int, steps: BinaryIO) -> None:
    device = rank_device(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the CPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.tp))
    store = dist.TCPStore(host, port, spec.tp, is_master=False,
                          timeout=datetime.timedelta(seconds=spec.load_timeout_s))
    join_group(spec, store, rank, device)
    model = load_shard(spec, rank, device)
    store.set(f"loaded/{rank}", "1")
    _wait_keys(store, [f"loaded/{r}" for r in range(spec.tp)], spec.load_timeout_s, "loaded")
    runner = shard_runner(spec, model)
    store.set(f"ready/{rank}", "1")
    log.info("ready: %s, %s pages", device, "+".join(map(str, spec.num_pages)))
    while True:
        inputs = read_message(steps)
        if inputs is None:  # rank 0 is gone: nobody to leave the group with
            log.info("rank 0's step pipe closed: exiting")
            return
        if isinstance(inputs, Stop):
            break
        runner.follow(inputs)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvpilot.worker.parallel",
                                 description="A rank > 0 of a tensor-parallel replica (started "
                                             "by rank 0, reads its steps on stdin).")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store", required=True, help="host:port of rank 0's TCPStore")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s rank {a.rank} %(name)s: %(message)s")
    from kvpilot.worker.termination import write_termination

    steps = sys.stdin.buffer
    host, port = a.store.rsplit(":", 1)
    try:
        spec = read_message(steps)
        if spec is None:
            return 0
        run_follower(spec, a.rank, host, int(port), steps)
    except Exception as err:  # noqa: BLE001 - reported to rank 0, then the process exits
        log.exception("rank %d failed", a.rank)
        write_termination(contract.REASON_RANK_FAILED, f"{type(err).__name__}: {err}")
        return 1
    return 0


if __name__ == "__main__":
    # Run as the imported module, not as __main__, so the messages rank 0 pickles
    # (kvpilot.worker.parallel.Stop, ...) are the classes this process compares with.
    from kvpilot.worker import parallel

    sys.exit(parallel.main())
