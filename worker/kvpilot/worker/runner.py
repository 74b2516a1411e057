"""The model runner: the only part of the engine that touches torch devices.

It owns the paged KV cache (one ``LayerKV`` per layer, ``kvpilot.worker.kernels.cache``)
and turns a scheduled batch into tensors: token ids, positions, slots (where each new
token's K/V goes), block tables and lengths, all read off the block manager's tables.

Prefill
    All new tokens of the batch go through the model as one ``[tokens, hidden]`` matrix.
    Per layer, ``reshape_and_cache`` first writes their K/V into the pages, then each
    sequence attends with ``scaled_dot_product_attention``: causal over its own new
    tokens when nothing of it was cached, else over its whole length gathered back from
    the pages (a prefix-cache hit), with the causal mask aligned to the end. Only the
    last token of each sequence goes through the LM head.

Decode
    One token per sequence; attention is the Triton paged kernel on a GPU and the PyTorch
    reference on CPU. On a GPU each step replays a CUDA graph captured for the smallest
    batch-size bucket that holds the batch (padding rows write to slot -1 and have length
    0): the kernel launcher's host work, 116-173 us a call, and the Python of 32 layers
    would otherwise cost more than the kernels at small batches. The split count of the
    paged kernel is fixed per bucket at capture, planned for the longest sequence the
    engine admits.

With ``debug_checks`` every table, length and slot is checked against the block manager
on the host before it reaches a kernel (``block_manager.check_batch``): the kernels trust
their inputs, and a bad page id reads garbage or kills the CUDA context.

Tensor parallelism
    Each rank has a runner over its shard of the model (``Llama.part``) and its own page
    pool of the same page count, holding its KV heads. Rank 0's runner is the engine's:
    it turns the block manager's tables into a ``PrefillInputs`` or ``DecodeInputs``,
    sends it to the other ranks (``kvpilot.worker.parallel.Followers``), then runs its
    shard; the other ranks' runners have no block manager and run what they are sent
    (``follow``). The all-reduces inside the model keep the ranks in step, decode graphs
    included (captured per rank, in the same order on every rank). Every rank gets the
    whole logits; only rank 0 samples, so sampling parameters are never sent. A step that
    fails on rank 0 after its inputs went out fails the replica (the others would wait in
    a collective), and each TP step ends with a device sync on every rank, so the step
    watchdog of ``Followers`` times what the GPUs did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kvpilot.worker.block_manager import BlockManager, check_batch
from kvpilot.worker.kernels import cache as kv_cache
from kvpilot.worker.kernels.reference import (
    dequantize,
    gather_sequence,
    paged_attention_ref,
    reshape_and_cache_ref,
)
from kvpilot.worker.model import Llama
from kvpilot.worker.scheduler import Sequence

KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": kv_cache.FP8_DTYPE,
             "fp32": torch.float32}


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a captured decode graph: 1, 2, 4, 8, then every 8 up to 64 and
    every 16 beyond, and ``max_num_seqs`` itself."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, min(max_num_seqs, 64) + 1, 8))
    sizes += list(range(80, max_num_seqs + 1, 16))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


@dataclass
class PrefillInputs:
    """One prefill step, as every rank runs it."""

    ids: np.ndarray  # int64 [tokens]: the new tokens of every sequence, in batch order
    positions: np.ndarray  # int64 [tokens]
    slots: np.ndarray  # int64 [tokens]: where each token's K/V goes
    spans: np.ndarray  # int64 [seqs, 4]: first and end row in ids, first and end position
    tables: list[np.ndarray]  # int64, each sequence's pages


@dataclass
class DecodeInputs:
    """One decode step, as every rank runs it: the first ``rows`` entries of rank 0's
    host buffer (``rows`` is the CUDA-graph bucket, or ``n`` when eager) and the block
    table rows of the ``n`` sequences up to the last page any of them reads."""

    n: int
    rows: int
    ids: np.ndarray  # int32 [rows]
    positions: np.ndarray
    slots: np.ndarray
    lens: np.ndarray
    table: np.ndarray  # int32 [n, pages]


@dataclass
class ProbeInputs:
    """Time the collectives of one decode step of ``rows`` sequences (benchmarks)."""

    rows: int
    iters: int


class Fanout(Protocol):
    """Rank 0's link to the other ranks (``kvpilot.worker.parallel.Followers``)."""

    def send(self, inputs) -> None: ...

    def step(self): ...  # a context manager around one step; raises RankFailed

    def close(self) -> None: ...


class ModelRunner:
    def __init__(self, model: Llama, block_manager: BlockManager | None, *, kv_dtype: str,
                 max_model_len: int, max_num_seqs: int, cuda_graphs: bool = True,
                 debug_checks: bool = False, followers: Fanout | None = None,
                 num_pages: int | None = None, page_size: int | None = None):
        """``block_manager`` on rank 0 (and at TP 1); a follower rank has none and is given
        the pool's ``num_pages`` and ``page_size``. ``followers``: rank 0's link to the
        other ranks of a tensor-parallel replica."""
        part = model.part
        self.model = model
        self.bm = block_manager
        self.followers = followers
        self.device = model.device
        self.page_size = page_size or block_manager.page_size
        self.num_pages = num_pages or block_manager.num_pages
        self.max_model_len = max_model_len
        self.max_pages = -(-max_model_len // self.page_size)
        self.max_num_seqs = max_num_seqs
        self.debug_checks = debug_checks
        self.on_gpu = self.device.type == "cuda"
        dtype = KV_DTYPES[kv_dtype]
        if dtype == torch.float32 and self.on_gpu:
            raise ValueError("an fp32 KV cache is for CPU only (the decode kernel reads "
                             "bf16, fp16 or fp8)")
        if dtype not in (torch.float32, kv_cache.FP8_DTYPE) and dtype != model.dtype:
            raise ValueError(f"KV cache dtype {kv_dtype} must match the model's {model.dtype}")
        self.kv_dtype = dtype
        self.layers: list[kv_cache.LayerKV] = []
        n = self.num_pages
        for _ in range(model.cfg.num_layers):
            if dtype == torch.float32:
                shape = (n, self.page_size, part.num_kv_heads, part.head_dim)
                self.layers.append(kv_cache.LayerKV(torch.zeros(shape), torch.zeros(shape)))
            else:
                self.layers.append(kv_cache.allocate_layer(
                    n, self.page_size, part.num_kv_heads, part.head_dim, dtype, self.device))
        # Of this rank's pool: kvpilot.api.memory.kv_bytes_per_token(arch, dtype, tp).
        self.kv_bytes_per_token = (2 * model.cfg.num_layers * part.num_kv_heads * part.head_dim
                                   * self.layers[0].key.element_size())
        self._graphs: dict[int, _Graph] = {}
        self._buckets: list[int] = []  # batch sizes with a graph, ascending
        # Decode inputs, int32, in one buffer: ids, positions, slots, lengths (one per row
        # each), then the block table. The host fills a pinned copy and one transfer moves
        # it; CUDA graphs read the device copy, whose address never changes.
        b, p = max_num_seqs, self.max_pages
        host = torch.zeros(4 * b + b * p, dtype=torch.int32, pin_memory=self.on_gpu)
        host[2 * b:3 * b] = -1  # slots: no writes until a row is used
        dev = host.to(self.device) if self.on_gpu else host
        self._host, self._dev = host, dev
        h = host.numpy()
        self._h = [h[i * b:(i + 1) * b] for i in range(4)] + [h[4 * b:].reshape(b, p)]
        self._ids, self._pos, self._slots, self._lens = (dev[i * b:(i + 1) * b] for i in range(4))
        self._table = dev[4 * b:].view(b, p)
        # Which page table (the block manager's list, held, so never another) and length
        # each host row holds: most rows are unchanged from one step to the next.
        self._row_owner: list[tuple[list[int], int] | None] = [None] * b
        self.cuda_graphs = self.on_gpu and cuda_graphs
        if self.cuda_graphs:
            self.capture_graphs()

    @property
    def kv_capacity_bytes(self) -> int:
        """Of this rank's pool."""
        return self.num_pages * self.page_size * self.kv_bytes_per_token

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel replica (nothing at TP 1)."""
        if self.followers is not None:
            self.followers.close()

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()

    def _fan_out(self, inputs, run):
        """Run a step on rank 0 and, at TP > 1, on the other ranks: they get ``inputs``
        first, and the step ends when this rank's device is done with it."""
        if self.followers is None:
            return run()
        with self.followers.step():
            self.followers.send(inputs)
            out = run()
            self._sync()
        return out

    def follow(self, inputs) -> None:
        """A follower rank: run a step rank 0 sent (its logits are rank 0's to use)."""
        if isinstance(inputs, PrefillInputs):
            self._prefill_run(inputs)
        elif isinstance(inputs, DecodeInputs):
            ids, pos, slots, lens, table = self._h
            r, n = inputs.rows, inputs.n
            ids[:r], pos[:r], slots[:r], lens[:r] = (inputs.ids, inputs.positions,
                                                     inputs.slots, inputs.lens)
            table[:n, :inputs.table.shape[1]] = inputs.table
            self._decode_run(n, r)
        elif isinstance(inputs, ProbeInputs):
            self._probe_run(inputs)
        else:
            raise TypeError(f"not a step: {type(inputs).__name__}")
        self._sync()

    # ---- K/V writes -------------------------------------------------------------------
    def _write(self, layer: kv_cache.LayerKV, k, v, slots) -> None:
        if self.on_gpu:
            kv_cache.reshape_and_cache(k, v, layer, slots)
        else:
            reshape_and_cache_ref(k, v, layer.key, layer.value, slots, layer.k_scale,
                                  layer.v_scale)

    def _slots_of(self, seq: Sequence, start: int, end: int) -> list[int]:
        table, ps = self.bm.table(seq.seq_id), self.page_size
        return [table[p // ps] * ps + p % ps for p in range(start, end)]

    def _check(self, seqs: list[Sequence], writes: list[tuple[int, int, int]]) -> None:
        check_batch(self.bm, [s.seq_id for s in seqs], [self.bm.table(s.seq_id) for s in seqs],
                    [len(s) for s in seqs], writes)

    # ---- prefill ----------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute tokens ``num_computed..len-1`` of each sequence; logits of each last
        token, float32 ``[len(seqs), vocab]``."""
        inputs = self._prefill_inputs(seqs)
        return self._fan_out(inputs, lambda: self._prefill_run(inputs))

    def _prefill_inputs(self, seqs: list[Sequence]) -> PrefillInputs:
        ids, pos, slots, spans = [], [], [], []
        for s in seqs:
            start, end = s.num_computed, len(s)
            ids += s.tokens[start:end]
            pos += range(start, end)
            slots += self._slots_of(s, start, end)
            spans.append((len(ids) - (end - start), len(ids), start, end))
        if self.debug_checks:
            self._check(seqs, [(s.seq_id, p, sl) for s, (t0, t1, a, b) in zip(seqs, spans)
                               for p, sl in zip(range(a, b), slots[t0:t1])])
        return PrefillInputs(
            ids=np.asarray(ids, dtype=np.int64), positions=np.asarray(pos, dtype=np.int64),
            slots=np.asarray(slots, dtype=np.int64), spans=np.asarray(spans, dtype=np.int64),
            tables=[np.asarray(self.bm.table(s.seq_id), dtype=np.int64) for s in seqs])

    @torch.inference_mode()
    def _prefill_run(self, inp: PrefillInputs) -> torch.Tensor:
        dev = self.device
        input_ids = torch.from_numpy(inp.ids).to(dev)
        positions = torch.from_numpy(inp.positions).to(dev)
        slot_t = torch.from_numpy(inp.slots).to(dev)
        tables = [torch.from_numpy(t).to(dev) for t in inp.tables]
        spans = inp.spans.tolist()
        part = self.model.part
        group = part.num_heads // part.num_kv_heads

        def attend(i, q, k, v):
            layer = self.layers[i]
            self._write(layer, k, v, slot_t)
            out = torch.empty_like(q)
            for (t0, t1, start, end), table in zip(spans, tables):
                qs = q[t0:t1].transpose(0, 1)[None]  # [1, Hq, n, D]
                if start == 0:
                    ks, vs, causal, mask = k[t0:t1], v[t0:t1], True, None
                else:  # a cached prefix: read the whole sequence back from the pages
                    ks = dequantize(gather_sequence(layer.key, table, end), layer.k_scale)
                    vs = dequantize(gather_sequence(layer.value, table, end), layer.v_scale)
                    ks, vs = ks.to(q.dtype), vs.to(q.dtype)
                    qpos = torch.arange(start, end, device=dev)[:, None]
                    mask, causal = torch.arange(end, device=dev)[None, :] <= qpos, False
                ks = ks.transpose(0, 1).repeat_interleave(group, dim=0)[None]
                vs = vs.transpose(0, 1).repeat_interleave(group, dim=0)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal)
                out[t0:t1] = o[0].transpose(0, 1)
            return out

        hidden = self.model.forward(input_ids, positions, attend)
        last = torch.tensor([t1 - 1 for _, t1, _, _ in spans], dtype=torch.long, device=dev)
        return self.model.logits(hidden[last])

    # ---- decode -----------------------------------------------------------------------
    def _decode_inputs(self, seqs: list[Sequence], rows: int) -> None:
        """Fill the host buffer for one decode step, padded to ``rows`` (padding rows have
        length 0 and slot -1: nothing read, nothing written)."""
        ids, pos, slots, lens, table = self._h
        n = len(seqs)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=n)
        ids[:n] = [s.tokens[-1] for s in seqs]
        lens[:n] = lengths
        pos[:n] = lengths - 1
        ids[n:rows] = pos[n:rows] = lens[n:rows] = 0
        slots[n:rows] = -1
        for r, s in enumerate(seqs):
            pages = self.bm.table(s.seq_id)
            owner = self._row_owner[r]
            if owner is not None and owner[0] is pages and owner[1] == len(pages):
                continue
            start = owner[1] if owner is not None and owner[0] is pages and owner[1] < len(pages) else 0
            table[r, start:len(pages)] = pages[start:]
            self._row_owner[r] = (pages, len(pages))
        ps = self.page_size
        last = lengths - 1
        slots[:n] = table[np.arange(n), last // ps] * ps + last % ps
        if self.debug_checks:  # what is handed over, not what should have been
            check_batch(self.bm, [s.seq_id for s in seqs],
                        [table[r, :len(self.bm.table(s.seq_id))].tolist() for r, s in enumerate(seqs)],
                        lens[:n].tolist(),
                        [(s.seq_id, int(pos[r]), int(slots[r])) for r, s in enumerate(seqs)])

    def _decode_forward(self, ids, pos, slots, table, lens, num_splits: int | None):
        from kvpilot.worker.kernels.paged_attention import paged_attention_decode

        def attend(i, q, k, v):
            layer = self.layers[i]
            self._write(layer, k, v, slots)
            if not self.on_gpu:
                return paged_attention_ref(q, layer.key, layer.value, table, lens,
                                           k_scale=layer.k_scale, v_scale=layer.v_scale).to(q.dtype)
            return paged_attention_decode(q, layer.key, layer.value, table, lens,
                                          k_scale=layer.k_scale, v_scale=layer.v_scale,
                                          max_seq_len=self.max_model_len, num_splits=num_splits)

        return self.model.logits(self.model.forward(ids, pos, attend))

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute the last token of each sequence; float32 logits ``[len(seqs), vocab]``."""
        n = len(seqs)
        bucket = next((b for b in self._buckets if b >= n), None)
        rows = bucket or n
        self._decode_inputs(seqs, rows)
        inputs = None
        if self.followers is not None:
            ids, pos, slots, lens, table = self._h
            pages = -(-int(lens[:n].max()) // self.page_size)
            inputs = DecodeInputs(n, rows, ids[:rows].copy(), pos[:rows].copy(),
                                  slots[:rows].copy(), lens[:rows].copy(),
                                  table[:n, :pages].copy())
        return self._fan_out(inputs, lambda: self._decode_run(n, rows))

    @torch.inference_mode()
    def _decode_run(self, n: int, rows: int) -> torch.Tensor:
        """One decode step over the first ``rows`` rows of the host buffer: the graph of
        bucket ``rows`` if there is one, else eager; logits of the first ``n``."""
        if self.on_gpu:
            self._dev.copy_(self._host, non_blocking=True)
        g = self._graphs.get(rows)
        if g is not None:
            g.graph.replay()
            return g.logits[:n]
        return self._decode_forward(self._ids[:n], self._pos[:n], self._slots[:n],
                                    self._table[:n], self._lens[:n], None)

    def capture_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket, largest first, sharing one
        memory pool. Each is run eagerly once first (Triton compiles, and the paged
        kernel learns its occupancy, which fixes the split count)."""
        from kvpilot.worker.kernels.paged_attention import plan_num_splits

        part = self.model.part
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(graph_buckets(self.max_num_seqs)):
                q = torch.empty(b, part.num_heads, part.head_dim, dtype=self.model.dtype,
                                device=self.device)
                args = (self._ids[:b], self._pos[:b], self._slots[:b], self._table[:b],
                        self._lens[:b])
                self._decode_forward(*args, None)  # compile, learn occupancy
                splits = plan_num_splits(q, self.layers[0].key, self._table[:b],
                                         max_seq_len=self.max_model_len)
                self._decode_forward(*args, splits)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._decode_forward(*args, splits)
                self._graphs[b] = _Graph(graph, logits)
        self._buckets = sorted(self._graphs)
        torch.cuda.synchronize()

    # ---- collectives probe (benchmarks) -----------------------------------------------
    def probe_collectives(self, rows: int, iters: int = 50) -> float:
        """Seconds the collectives of one decode step of ``rows`` sequences take on their
        own (every rank runs them; 0 at TP 1): 2 all-reduces per layer and one for the
        embedding of ``[rows, hidden]``, and the all-gather of the logits, in the model's
        dtype. With CUDA graphs they are captured in one, as in a decode step."""
        if self.followers is None:
            return 0.0
        inputs = ProbeInputs(rows, iters)
        return self._fan_out(inputs, lambda: self._probe_run(inputs))

    @torch.inference_mode()
    def _probe_run(self, inp: ProbeInputs) -> float:
        model, cfg = self.model, self.model.cfg
        comm = model.comm
        x = torch.zeros(inp.rows, cfg.hidden_size, dtype=model.dtype, device=self.device)
        y = torch.zeros(inp.rows, model.part.vocab_rows, dtype=model.dtype, device=self.device)

        def step():
            for _ in range(2 * cfg.num_layers + 1):
                comm.all_reduce_(x)
            comm.all_gather_columns(y)

        run = step
        if self.cuda_graphs:
            step()  # warm up outside the graph
            self._sync()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        run()
        self._sync()
        start = time.perf_counter()
        for _ in range(inp.iters):
            run()
        self._sync()
        return (time.perf_counter() - start) / inp.iters
