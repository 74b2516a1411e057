"""The scrape of worker /metrics against workers that misbehave (issue #29): one that
hangs, one that drips its answer a byte at a time, one that answers garbage and one
that answers 10 MB. A round over them and a healthy worker ends within its timeout plus
slack, reads the healthy worker, and counts every other one as no answer; the event
loop is never held by a body.

Bounds are generous (the timeout is 1 s, a round may take 6 s); without the bounds the
dripping worker holds the round until the test's own 60 s guard."""

from __future__ import annotations

import asyncio
import time

import httpx

from kvpilot.api import contract
from kvpilot.operator.scrape import MAX_BODY_BYTES, drain, scrape_all

MODEL = "m"
GOOD = (f'{contract.KV_USED_BYTES}{{{contract.LABEL_MODEL}="{MODEL}"}} 30\n'
        f'{contract.KV_CAPACITY_BYTES}{{{contract.LABEL_MODEL}="{MODEL}"}} 100\n'
        f'{contract.REQUESTS_WAITING}{{{contract.LABEL_MODEL}="{MODEL}"}} 2\n')
TIMEOUT = 1.0
SLACK = 5.0


def _head(length: int | None = None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{size}\r\n".encode()


async def _answer(how: str, writer: asyncio.StreamWriter) -> None:
    if how == "good":
        writer.write(_head(len(GOOD)) + GOOD.encode())
    elif how == "hang":
        await asyncio.sleep(3600)
    elif how == "slow":  # a byte every 0.1 s: each read is quick, the answer never ends
        writer.write(_head(10**6))
        for _ in range(10**6):
            writer.write(b"#")
            await writer.drain()
            await asyncio.sleep(0.1)
    elif how == "garbage":
        body = b"\x00\xff{{{ not metrics <html>\n" * 100
        writer.write(_head(len(body)) + body)
    elif how in ("huge", "huge-chunked"):
        # Valid metrics for the model, padded with 10 MB of other series: parsed whole,
        # they would hold the event loop for seconds.
        pad = "".join(f'kvpilot_pad{{{contract.LABEL_MODEL}="{MODEL}",i="{i}"}} 1\n'
                      for i in range(10 * 2**20 // 40)).encode()
        body = GOOD.encode() + pad
        if how == "huge":
            writer.write(_head(len(body)) + body)
        else:  # no Content-Length: only counting the bytes finds it too large
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 65536):
                part = body[i:i + 65536]
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
    elif how == "drain-huge":
        body = b'{"drained": true, "pad": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}'
        writer.write(_head(len(body)) + body)
    await writer.drain()


async def _round(behaviours: dict[str, str]):
    """Serve each behaviour on its own loopback address (one port for all), scrape them
    all once; (results, seconds, the event loop's longest stall meanwhile)."""
    servers, port = [], None
    ips = {how: f"127.0.29.{i + 1}" for i, how in enumerate(behaviours)}
    for how, ip in ips.items():
        server = await _bind(behaviours[how], ip, port)
        servers.append(server)
        port = port or server.sockets[0].getsockname()[1]
    stall, stop = 0.0, asyncio.Event()

    async def ticker():
        nonlocal stall
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            stall, last = max(stall, now - last - 0.02), now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        results = await asyncio.wait_for(scrape_all(
            client, [(how, ip, MODEL) for how, ip in ips.items()], port, TIMEOUT), 60)
    seconds = time.monotonic() - started
    stop.set()
    await tick
    for s in servers:
        s.close()
    return results, seconds, stall


async def _bind(how: str, ip: str, port: int | None) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            await _answer(how, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, ip, port or 0)


def test_a_round_over_misbehaving_workers_is_bounded_and_reads_the_healthy_one():
    behaviours = {b: b for b in ("good", "hang", "slow", "garbage", "huge", "huge-chunked")}
    results, seconds, stall = asyncio.run(_round(behaviours))
    good, why = results["good"]
    assert why == "" and (good.kv_used, good.kv_capacity, good.waiting) == (30, 100, 2)
    for how in ("hang", "slow", "garbage", "huge", "huge-chunked"):
        assert results[how][0] is None, how
    assert "within 1s" in results["hang"][1] and "within 1s" in results["slow"][1]
    assert "Content-Length" in results["huge"][1]
    assert f"over {MAX_BODY_BYTES} bytes" in results["huge-chunked"][1]
    assert "ValueError" in results["garbage"][1]
    assert seconds < TIMEOUT + SLACK, seconds
    assert stall < 1.0, f"the event loop stalled {stall:.2f}s"


def test_a_drain_answer_beyond_the_bound_is_no_answer():
    async def run():
        server = await _bind("drain-huge", "127.0.29.1", None)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as client:
            got = await drain(client, "127.0.29.1", port, TIMEOUT)
        server.close()
        return got

    assert asyncio.run(run()) is None
