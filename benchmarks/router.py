"""What the router adds to a request, against the same requests sent directly.

    python benchmarks/router.py                       # defaults: 2,000 sequential, 10 s at 32
    python benchmarks/router.py --requests 500 --seconds 5 --concurrency 64

One run, three processes on this machine: a fake replica that answers every completion
at once (a fixed 300-byte JSON body: nothing but HTTP), ``kvpilot router --upstream`` in
front of it (prefix policy, its usual work per request: body, prompt head, block hashes,
index, pick, httpx to the replica, the answer back), and this script's client (raw
asyncio HTTP/1.1 on kept-alive connections, so the client costs as little as it can).
Prompts are 1,000 characters from 64 conversations.

- latency: one request at a time, direct and through the router: p50 and p99, and the
  difference (what the router adds);
- throughput: ``--concurrency`` connections for ``--seconds``, direct and through the
  router: requests per second (the most this machine serves either way).

Every figure is printed beside its baseline with their ratio, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "worker")]

from machine import hardware  # noqa: E402  (beside this script)

MODEL = "bench"
ANSWER = json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 0,
                     "model": MODEL, "choices": [{"index": 0, "text": " one two three four",
                                                  "finish_reason": "length",
                                                  "logprobs": None}],
                     "usage": {"prompt_tokens": 250, "completion_tokens": 4,
                               "total_tokens": 254}}).encode()


# -- the fake replica ------------------------------------------------------------------------

class _Replica(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: every request with a Content-Length body gets ANSWER."""

    def connection_made(self, transport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0
                              else len(head)]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            if head.startswith(b"get /metrics"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                continue
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(ANSWER)).encode() +
                                 b"\r\n\r\n" + ANSWER)


def serve_replica(port: int) -> None:
    async def main():
        server = await asyncio.get_running_loop().create_server(_Replica, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


# -- the client ------------------------------------------------------------------------------

def requests_bytes(port: int, n: int = 64) -> list[bytes]:
    out = []
    for c in range(n):
        prompt = (f"conversation {c}: " + "memory bandwidth decides decode speed " * 40)[:1000]
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4}).encode()
        out.append(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:" + str(port).encode() +
                   b"\r\ncontent-type: application/json\r\ncontent-length: " +
                   str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


async def _one(reader, writer, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    lower = head.lower()
    i = lower.index(b"content-length:")
    await reader.readexactly(int(lower[i + 15:lower.index(b"\r\n", i)]))


async def sequential(port: int, n: int) -> list[float]:
    reqs = requests_bytes(port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(50):  # warm up: connections, caches
        await _one(reader, writer, reqs[i % len(reqs)])
    out = []
    for i in range(n):
        t = time.perf_counter()
        await _one(reader, writer, reqs[i % len(reqs)])
        out.append(time.perf_counter() - t)
    writer.close()
    return out


async def saturate(port: int, connections: int, seconds: float) -> float:
    reqs = requests_bytes(port)
    done = 0
    stop = time.perf_counter() + seconds

    async def conn(k: int) -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < stop:
            await _one(reader, writer, reqs[i % len(reqs)])
            done += 1
            i += connections
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(conn(k) for k in range(connections)))
    return done / (time.perf_counter() - started)


# -- the run ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per path")
    ap.add_argument("--seconds", type=float, default=10, help="seconds of saturation per path")
    ap.add_argument("--concurrency", type=int, default=32, help="connections when saturating")
    ap.add_argument("--serve-replica", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_replica:
        serve_replica(args.serve_replica)
        return 0

    replica_port, router_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in
                                                       ("operator", "worker"))}
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-replica", str(replica_port)],
                              env=env),
             subprocess.Popen([sys.executable, "-m", "kvpilot.router", "--host=127.0.0.1",
                               f"--port={router_port}", "--scrape-interval=1",
                               f"--upstream={MODEL}=http://127.0.0.1:{replica_port}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_port(replica_port)
        wait_port(router_port)
        direct = asyncio.run(sequential(replica_port, args.requests))
        routed = asyncio.run(sequential(router_port, args.requests))
        direct_rps = asyncio.run(saturate(replica_port, args.concurrency, args.seconds))
        routed_rps = asyncio.run(saturate(router_port, args.concurrency, args.seconds))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)

    ms = lambda s: 1000 * s  # noqa: E731
    d50, d99 = ms(statistics.median(direct)), ms(pct(direct, 0.99))
    r50, r99 = ms(statistics.median(routed)), ms(pct(routed, 0.99))
    print(f"machine: {hardware()}")
    print(f"requests: {args.requests} sequential per path; saturation: {args.concurrency} "
          f"connections for {args.seconds:g} s per path; a 1,000-character prompt, a "
          f"{len(ANSWER)}-byte answer")
    print(f"{'':<28}{'direct':>10}{'router':>10}{'added':>10}{'ratio':>8}")
    print(f"{'latency p50 (ms)':<28}{d50:>10.3f}{r50:>10.3f}{r50 - d50:>10.3f}{r50 / d50:>8.2f}")
    print(f"{'latency p99 (ms)':<28}{d99:>10.3f}{r99:>10.3f}{r99 - d99:>10.3f}{r99 / d99:>8.2f}")
    print(f"{'throughput (requests/s)':<28}{direct_rps:>10.0f}{routed_rps:>10.0f}{'':>10}"
          f"{routed_rps / direct_rps:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
