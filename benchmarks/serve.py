"""The worker as clients see it: streamed completions through its HTTP server, this
checkout's worker against a baseline commit's, same run, same machine.

    python benchmarks/serve.py                                  # GPU: Llama-3-8B shape
    python benchmarks/serve.py --baseline abf4406 --concurrency 1,32,64,128 --rate inf,8
    python benchmarks/serve.py --shape tiny --prompt 32 --output 16 --concurrency 1,4  # CPU

1. A checkpoint: Llama-3-8B's shape (32 layers, hidden 4096, 32 query and 8 KV heads of
   128, MLP 14336, vocabulary 128256) with random bf16 weights, written with torch as
   safetensors shards (kept in ``--checkpoint``, reused next time), and a tokenizer with
   one plain-text word per id, so that every generated token streams as its own event
   and detokenizes. ``--shape tiny``: the tiny random Llama of ``kvpilot.worker.tiny``
   (float32, on CPU) with the same kind of tokenizer.
2. The read ceiling: on a GPU the best plain read of 4 GiB
   (``benchmarks/decode_kernel.py``), on CPU ``torch.sum`` of 512 MiB.
3. Each worker, started as the operator starts it: ``python -m kvpilot.worker --model
   DIR --host --port`` plus engine arguments (``--max-num-seqs``: the largest
   concurrency), with the Model in the environment (``kvpilot.api.contract``: the spec
   described from the checkpoint with an SLA of prompt + output tokens x the largest
   concurrency, its name, the HBM budget placement would reserve, TP 1). First this
   checkout's worker ("new"), then the baseline's: ``--baseline REF``'s ``operator/``
   and ``worker/`` exported with ``git archive`` into a temporary directory (a worktree
   of the commit, without touching this checkout), run with the same interpreter.
4. Per concurrency and rate: clients (aiohttp, one event loop) send streamed
   ``/v1/completions`` of ``--prompt`` random token ids, ``max_tokens`` ``--output``,
   greedy, ``ignore_eos`` (every output is full length). Rate ``inf``: a closed loop, each
   of the ``concurrency`` clients sending its next request when its last one ends;
   a number: Poisson arrivals at that many requests per second, at most ``concurrency``
   in flight. ``--requests-per-client`` x concurrency requests per run, after one
   warm-up request.

Reported per run: output tokens/s (all output tokens / wall time), TTFT p50/p99, ITL p50
and p99 (time between a stream's events, each one token), and the ITL-implied bandwidth:
bytes one decode step reads (the weights but the embedding table, plus the KV of the
mean decode batch at the mean context, prompt + output / 2) / ITL p50, against the read
ceiling. Each baseline row is printed next to the new one, then their ratio (new /
baseline), with the hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT / "operator"), str(ROOT / "benchmarks")]

from machine import hardware  # noqa: E402  (beside this script)

NAME = "bench"
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
SHARD_BYTES = 4 * 10**9


def log(*a) -> None:
    print(*a, flush=True)


# ---- the checkpoint ---------------------------------------------------------------------
def write_word_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """``tokenizer.json`` with one word per id (``w0`` .. ``w<vocab-1>``, split on
    whitespace, joined by spaces when decoded) and no special tokens: any id decodes to
    text of its own, so each generated token is one event of a stream."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1 << 20}))


def write_checkpoint(model_dir: Path, shape: str) -> Path:
    """The checkpoint of ``shape`` in ``model_dir`` (reused when complete)."""
    done = model_dir / "complete"
    if done.exists() and done.read_text() == shape:
        log(f"checkpoint: {model_dir} (reused)")
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    if shape == "tiny":
        from kvpilot.worker.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(model_dir, seed=0, max_positions=8192)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    else:
        import torch
        from safetensors.torch import save_file

        from kvpilot.worker.model import hf_state_dict, load_config, random_weights

        (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG, indent=2))
        (model_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))
        cfg = load_config(model_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        weights = random_weights(cfg, device, torch.bfloat16, seed=0)
        tensors = hf_state_dict(cfg, weights)
        shard: dict = {}
        size, index, weight_map = 0, 0, {}
        names = list(tensors)
        for i, name in enumerate(names):
            t = tensors[name].contiguous().cpu()
            shard[name] = t
            size += t.numel() * t.element_size()
            if size >= SHARD_BYTES or i == len(names) - 1:
                index += 1
                file = f"model-{index:05d}.safetensors"
                save_file(shard, str(model_dir / file), metadata={"format": "pt"})
                weight_map.update({n: file for n in shard})
                shard, size = {}, 0
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}, indent=1))
        del weights, tensors
        if device == "cuda":
            torch.cuda.empty_cache()
        vocab = cfg.vocab_size
        log(f"checkpoint: {index} shards written to {model_dir} in "
            f"{time.perf_counter() - t0:.0f} s")
    write_word_tokenizer(model_dir, vocab)
    done.write_text(shape)
    return model_dir


@dataclass(frozen=True)
class Shape:
    """What a decode step of this checkpoint reads."""

    vocab_size: int
    weight_read_bytes: int  # all weights but the embedding table
    kv_bytes_per_token: int  # K and V of every layer
    params_dtype: str


def shape_of(model_dir: Path, device: str) -> Shape:
    from kvpilot.worker.model import load_config

    cfg = load_config(model_dir)
    dtype = "bf16" if device == "cuda" else "fp32"
    size = 2 if dtype == "bf16" else 4
    embed = cfg.vocab_size * cfg.hidden_size
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size
    return Shape(cfg.vocab_size, (cfg.num_parameters() - embed) * size, kv, dtype)


# ---- the read ceiling -------------------------------------------------------------------
def read_ceiling_gbs(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        from decode_kernel import read_ceiling

        best = read_ceiling(lambda *a: None)
        torch.cuda.empty_cache()
        return best, "best plain read of 4 GiB"
    x = torch.ones(1 << 27)  # 512 MiB of float32
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9, "torch.sum of 512 MiB"


# ---- a worker ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """``python -m kvpilot.worker`` from the source roots under ``root``, with the
    operator's environment."""

    def __init__(self, root: Path, model_dir: Path, *, device: str, context: int,
                 concurrency: int, log_file: Path):
        from kvpilot.api import contract
        from kvpilot.api.memory import replica_budget
        from kvpilot.worker.config import spec_from_checkpoint
        from kvpilot.worker.model import load_config

        dtype = "bf16" if device == "cuda" else "fp32"
        spec = spec_from_checkpoint(load_config(model_dir), params_dtype=dtype,
                                    kv_dtype="bf16", max_model_len=context,
                                    concurrent=concurrency)
        env = {**os.environ, "PYTHONPATH": f"{root / 'operator'}:{root / 'worker'}",
               contract.ENV_MODEL_SPEC: json.dumps(spec.model_dump(by_alias=True, mode="json")),
               contract.ENV_MODEL_NAME: NAME,
               contract.ENV_HBM_PER_GPU: str(replica_budget(spec, 1).per_gpu),
               contract.ENV_TENSOR_PARALLEL: "1",
               contract.ENV_TERMINATION_LOG: str(log_file.with_suffix(".termination"))}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self.ready_path = contract.PATH_READY
        with open(log_file, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpilot.worker", "--model", str(model_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--device", device,
                 "--max-num-seqs", str(concurrency), "--log-level", "warning"],
                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n"
                                   + self.log_file.read_text()[-4000:])
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the worker was not ready in time:\n"
                                   + self.log_file.read_text()[-4000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        try:  # whatever of its process group is left (its engine core, its ranks)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def baseline_tree(ref: str, into: Path) -> tuple[Path, str]:
    """``ref``'s source roots exported into ``into``; and the commit's short name."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "operator", "worker"],
                             cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into, commit


def this_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker", "operator"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return out + ("+changes" if dirty else "")


# ---- the clients ------------------------------------------------------------------------
@dataclass
class Timed:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


async def one_request(session, url: str, prompt: list[int], output: int) -> Timed:
    body = {"model": NAME, "prompt": prompt, "max_tokens": output, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = Timed(time.perf_counter())
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {(await resp.text())[:500]}")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b'data: {"error"'):
                raise RuntimeError(line.decode()[:500])
            now = time.perf_counter()
            if r.first is None:
                r.first = now
            else:
                r.gaps.append(now - r.last)
            r.last = now
            r.tokens += 1
    return r


async def run_load(url: str, *, concurrency: int, rate: float, requests: int, prompt: int,
                   output: int, vocab: int, seed: int) -> tuple[list[Timed], float]:
    import aiohttp

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt)] for _ in range(requests + 1)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await one_request(session, url, prompts[-1], min(output, 8))  # warm-up
        results: list[Timed] = []
        start = time.perf_counter()
        if math.isinf(rate):
            queue = list(range(requests))

            async def client():
                while queue:
                    i = queue.pop()
                    results.append(await one_request(session, url, prompts[i], output))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            gate = asyncio.Semaphore(concurrency)

            async def arrive(i: int, at: float):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
                async with gate:
                    results.append(await one_request(session, url, prompts[i], output))

            at, tasks = 0.0, []
            for i in range(requests):
                at += rng.expovariate(rate)
                tasks.append(arrive(i, at))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return results, wall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Row:
    worker: str
    concurrency: int
    rate: float
    requests: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    decode_batch: float  # mean sequences decoding at once (Little's law)
    bytes_per_step: float
    gb_per_s: float  # bytes_per_step / ITL p50
    of_ceiling: float


def summarize(worker: str, concurrency: int, rate: float, results: list[Timed], wall: float,
              *, shape: Shape, prompt: int, output: int, ceiling: float) -> Row:
    short = [r for r in results if r.tokens != output]
    if short:
        raise RuntimeError(f"{len(short)} requests got fewer than {output} tokens")
    gaps = [g for r in results for g in r.gaps]
    itl50 = percentile(gaps, 0.5)
    batch = sum(r.last - r.first for r in results) / wall
    step_bytes = shape.weight_read_bytes + batch * (prompt + output / 2) * shape.kv_bytes_per_token
    gbs = step_bytes / itl50 / 1e9 if itl50 > 0 else math.nan
    return Row(worker, concurrency, rate, len(results),
               sum(r.tokens for r in results) / wall,
               percentile([r.first - r.sent for r in results], 0.5) * 1e3,
               percentile([r.first - r.sent for r in results], 0.99) * 1e3,
               itl50 * 1e3, percentile(gaps, 0.99) * 1e3, batch, step_bytes, gbs, gbs / ceiling)


def bench_worker(label: str, root: Path, model_dir: Path, a, shape: Shape, ceiling: float,
                 work: Path) -> dict[tuple[int, float], Row]:
    context = a.prompt + a.output + 16
    worker = Worker(root, model_dir, device=a.device, context=context,
                    concurrency=max(a.concurrency), log_file=work / f"{label}.log")
    rows = {}
    try:
        t0 = time.perf_counter()
        worker.wait_ready(a.ready_timeout)
        log(f"{label}: ready in {time.perf_counter() - t0:.0f} s ({root})")
        for rate in a.rate:
            for c in a.concurrency:
                results, wall = asyncio.run(run_load(
                    worker.url, concurrency=c, rate=rate, requests=c * a.requests_per_client,
                    prompt=a.prompt, output=a.output, vocab=shape.vocab_size, seed=c))
                row = summarize(label, c, rate, results, wall, shape=shape, prompt=a.prompt,
                                output=a.output, ceiling=ceiling)
                rows[(c, rate)] = row
                log(f"  {label} concurrency {c} rate {rate:g}: {row.tokens_per_s:.0f} tok/s, "
                    f"TTFT p50 {row.ttft_p50_ms:.1f} ms, ITL p50 {row.itl_p50_ms:.2f} ms "
                    f"p99 {row.itl_p99_ms:.2f} ms")
    finally:
        worker.stop()
    return rows


# ---- the table --------------------------------------------------------------------------
COLUMNS = ("conc", "rate", "worker", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
           "ITL p99 ms", "batch", "GB/step", "GB/s", "of ceiling")


def table(new: dict, base: dict, a, baseline: str) -> list[str]:
    lines = [" | ".join(COLUMNS)]

    def fmt(row: Row) -> list[str]:
        return [f"{row.tokens_per_s:.0f}", f"{row.ttft_p50_ms:.1f}", f"{row.ttft_p99_ms:.1f}",
                f"{row.itl_p50_ms:.2f}", f"{row.itl_p99_ms:.2f}", f"{row.decode_batch:.1f}",
                f"{row.bytes_per_step / 1e9:.2f}", f"{row.gb_per_s:.0f}",
                f"{row.of_ceiling:.0%}"]

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f} x" if y and not math.isnan(y) else "-"

    for rate in a.rate:
        for c in a.concurrency:
            n, b = new[(c, rate)], base[(c, rate)]
            head = [str(c), f"{rate:g}"]
            lines.append(" | ".join(head + ["new"] + fmt(n)))
            lines.append(" | ".join(head + [f"baseline {baseline}"] + fmt(b)))
            lines.append(" | ".join(head + ["new / baseline"] + [
                ratio(n.tokens_per_s, b.tokens_per_s), ratio(n.ttft_p50_ms, b.ttft_p50_ms),
                ratio(n.ttft_p99_ms, b.ttft_p99_ms), ratio(n.itl_p50_ms, b.itl_p50_ms),
                ratio(n.itl_p99_ms, b.itl_p99_ms), ratio(n.decode_batch, b.decode_batch),
                "", ratio(n.gb_per_s, b.gb_per_s), ratio(n.of_ceiling, b.of_ceiling)]))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="abf4406",
                    help="the commit whose worker runs beside this checkout's")
    ap.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda for 8b, cpu for tiny")
    ap.add_argument("--concurrency", default="1,32,64,128")
    ap.add_argument("--rate", default="inf",
                    help="requests per second, comma-separated; inf: a closed loop")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--output", type=int, default=256, help="output tokens")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--checkpoint", help="where the checkpoint is written (and reused); "
                    "default: a directory under the temporary directory")
    ap.add_argument("--ready-timeout", type=float, default=1200.0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.rate = [float(r) for r in a.rate.split(",")]
    a.device = a.device or ("cuda" if a.shape == "8b" else "cpu")

    import torch

    if a.device == "cuda":
        hw = (f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch "
              f"{torch.__version__}; host {hardware()}")
    else:
        hw = f"CPU: {hardware()}, torch {torch.__version__}"
    log(f"hardware: {hw}")
    ceiling, how = read_ceiling_gbs(a.device)
    log(f"read ceiling: {ceiling:.0f} GB/s ({how})")
    model_dir = Path(a.checkpoint or Path(tempfile.gettempdir()) / f"kvpilot-serve-{a.shape}")
    write_checkpoint(model_dir, a.shape)
    shape = shape_of(model_dir, a.device)
    work = Path(tempfile.mkdtemp(prefix="kvpilot-serve-"))
    try:
        base_root, baseline = baseline_tree(a.baseline, Path(tempfile.mkdtemp(
            prefix="kvpilot-baseline-", dir=work)))
        new_label = this_commit()
        new = bench_worker("new", ROOT, model_dir, a, shape, ceiling, work)
        base = bench_worker("baseline", base_root, model_dir, a, shape, ceiling, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shape_name = "Llama-3-8B shape, random bf16" if a.shape == "8b" else "tiny Llama, random fp32"
    log("")
    log(f"serve: {shape_name} weights ({shape.weight_read_bytes / 1e9:.2f} GB read per step), "
        f"prompt {a.prompt}, output {a.output} tokens, streamed; new = {new_label}, "
        f"baseline = {baseline}")
    log(f"on {hw}; read ceiling {ceiling:.0f} GB/s ({how})")
    for line in table(new, base, a, baseline):
        log(line)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "hardware": hw, "ceiling_gb_per_s": ceiling, "shape": a.shape, "prompt": a.prompt,
            "output": a.output, "new": new_label, "baseline": baseline,
            "rows": [asdict(r) for r in [*new.values(), *base.values()]]}, indent=2))


if __name__ == "__main__":
    main()
