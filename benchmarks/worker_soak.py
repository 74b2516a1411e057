"""The worker under twice the load its KV cache holds, for minutes (issue #29).

    python benchmarks/worker_soak.py                     # 10 minutes, tiny model on CPU
    python benchmarks/worker_soak.py --seconds 60 --every 10

The tiny checkpoint (``kvpilot.worker.tiny``) is served as the tests serve it: the engine
core in a process of its own, the HTTP server (uvicorn) here. Its page pool holds
``--concurrent`` sequences of ``--context`` tokens; ``2 x concurrent`` clients (threads,
closed loop) each send completions of ``context`` tokens in all (prompt + ``max_tokens``,
greedy, ``ignore_eos``), so the demand on the cache is twice what it holds. The engine
must preempt (counted), and the waiting bound (``--max-waiting``) answers 429 to what
it cannot queue.

Every answer is checked: a 200 carries exactly ``max_tokens`` tokens, a 429 is an
explicit refusal with ``Retry-After``; anything else (a 5xx, a short answer, a dropped
connection) is a failure. Printed every ``--every`` seconds: requests done and refused,
preemptions, pages in use, and the resident memory of the server and of the engine core;
at the end, whether all of that held and the hardware.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "operator", ROOT / "worker", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks.machine import hardware  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Tally:
    done: int = 0  # 200 with every token asked for
    refused: int = 0  # 429 with Retry-After
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class ServedWorker:
    """The tiny worker: its engine core as a process, its HTTP server on a thread."""

    url: str
    engine: object
    server: object
    thread: threading.Thread

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


def serve_tiny(ckpt: Path, *, context: int, concurrent: int, max_waiting: int) -> ServedWorker:
    import uvicorn

    from kvpilot.worker.client import EngineClient
    from kvpilot.worker.config import WorkerSettings, spec_from_checkpoint
    from kvpilot.worker.ipc import CoreStart
    from kvpilot.worker.model import load_config
    from kvpilot.worker.server import ServerSettings, WorkerState, create_app, uvicorn_config

    spec = spec_from_checkpoint(load_config(ckpt), params_dtype="fp32", kv_dtype="fp32",
                                max_model_len=context, concurrent=concurrent)
    settings = WorkerSettings(model_dir=str(ckpt), name="tiny", spec=spec, device="cpu",
                              dtype="fp32", kv_dtype="fp32")
    engine = EngineClient(CoreStart(settings=settings), model_dir=str(ckpt),
                          max_waiting=max_waiting, stop_timeout=30)
    engine.start()
    engine.wait_ready(timeout=120)
    app = create_app(WorkerState(name="tiny", engine=engine), ServerSettings())
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return ServedWorker(f"http://127.0.0.1:{port}", engine, server, thread)


def client_loop(url: str, prompt: list[int], max_tokens: int, tally: Tally,
                stop: threading.Event) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            try:
                r = client.post("/v1/completions", json=body)
            except httpx.HTTPError as err:
                with tally.lock:
                    tally.failures.append(f"{type(err).__name__}: {err}")
                continue
            with tally.lock:
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens:
                    tally.done += 1
                elif r.status_code == 429 and r.headers.get("retry-after"):
                    tally.refused += 1
                    stop.wait(float(r.headers["retry-after"]) / 10)
                else:
                    tally.failures.append(f"{r.status_code}: {r.text[:200]}")


@dataclass
class SoakResult:
    tally: Tally
    preemptions: int
    pages_left: int
    rss: list[tuple[float, float, float]]  # (seconds, server MiB, engine core MiB)


def soak(worker: ServedWorker, *, seconds: float, clients: int, context: int,
         every: float = 10.0, out=None) -> SoakResult:
    """``clients`` closed-loop clients for ``seconds``; then the engine must go idle."""
    prompt_len = context // 4
    prompt = [(7 * i) % 200 + 10 for i in range(prompt_len)]
    max_tokens = context - prompt_len
    tally, stop = Tally(), threading.Event()
    core_pid = worker.engine.proc.pid
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(worker.url, prompt, max_tokens, tally, stop))
               for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    rss = []
    next_report = start
    while (now := time.monotonic()) < start + seconds:
        if now >= next_report:
            s = worker.engine.fresh_stats()
            rss.append((now - start, rss_mib(os.getpid()), rss_mib(core_pid)))
            if out is not None:
                print(f"{now - start:6.0f}s  done {tally.done:6d}  429 {tally.refused:6d}  "
                      f"failed {len(tally.failures):3d}  preemptions {s.preemptions:6d}  "
                      f"pages {s.pages_used:4d}/{s.pages_total}  server RSS "
                      f"{rss[-1][1]:7.1f} MiB  core RSS {rss[-1][2]:7.1f} MiB",
                      file=out, flush=True)
            next_report += every
        time.sleep(min(0.2, max(0.0, start + seconds - now)))
    stop.set()
    for t in threads:
        t.join(timeout=600)
    deadline = time.monotonic() + 60
    while (s := worker.engine.fresh_stats()).running or s.waiting or s.pages_used:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    rss.append((time.monotonic() - start, rss_mib(os.getpid()), rss_mib(core_pid)))
    return SoakResult(tally, s.preemptions, s.pages_used, rss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--every", type=float, default=30, help="seconds between report lines")
    p.add_argument("--context", type=int, default=256, help="tokens per request (in all)")
    p.add_argument("--concurrent", type=int, default=4, help="sequences the KV pool holds")
    p.add_argument("--max-waiting", type=int, default=4)
    args = p.parse_args(argv)
    from kvpilot.worker.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", seed=1)
        worker = serve_tiny(ckpt, context=args.context, concurrent=args.concurrent,
                            max_waiting=args.max_waiting)
        try:
            s = worker.engine.fresh_stats()
            print(f"tiny worker: {s.pages_total} pages of {s.page_size} tokens "
                  f"({s.pages_total * s.page_size} tokens); {2 * args.concurrent} clients "
                  f"of {args.context} tokens each (2x); {args.seconds:.0f} s on "
                  f"{hardware()}", flush=True)
            r = soak(worker, seconds=args.seconds, clients=2 * args.concurrent,
                     context=args.context, every=args.every, out=sys.stdout)
        finally:
            worker.close()
    first, last = r.rss[0], r.rss[-1]
    print(f"done {r.tally.done}, 429 {r.tally.refused}, failed {len(r.tally.failures)}, "
          f"preemptions {r.preemptions}, pages left {r.pages_left}; RSS server "
          f"{first[1]:.1f} -> {last[1]:.1f} MiB, core {first[2]:.1f} -> {last[2]:.1f} MiB")
    for f in r.tally.failures[:5]:
        print("  failure:", f)
    ok = not r.tally.failures and r.pages_left == 0 and r.preemptions > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
