"""The model runner: the only part of the engine that touches torch devices.

It owns the paged KV cache (one ``LayerKV`` per layer, ``kvpilot.worker.kernels.cache``)
and turns a scheduled batch into tensors: token ids, positions, slots (where each new
token's K/V goes), block tables and lengths, all read off the block manager's tables.

KV groups
    Layers that keep the same tokens share a page pool (``layer_groups``): global layers
    one, sliding-window layers another, a ring of pages per sequence
    (``kvpilot.worker.block_manager``). Each group has its own slots and block-table
    rows in every step's inputs.

Prefill (``prefill``: chunks of prompts)
    All new tokens of the batch go through the model as one ``[tokens, hidden]`` matrix.
    Per layer, each sequence first reads back from the pages what it attends to beyond
    its new tokens (a cached prefix or an earlier chunk; in a window only the window),
    then ``reshape_and_cache`` writes the new K/V (in a ring only what the ring keeps),
    then each sequence attends (``attention``): causal over its own new tokens, after
    what it read back, within its window. Only the last token of each sequence goes
    through the LM head.

Decode (``decode``)
    One token per sequence; attention is the Triton paged kernel on a GPU and the CPU
    backend (``kernels.cpu``) on CPU. On a GPU each step replays a CUDA graph captured
    for the smallest batch-size bucket that holds the batch (padding rows write to slot
    -1 and have length 0): the kernel launcher's host work and the Python of 32 layers
    would otherwise cost more than the kernels at small batches. The split count of the
    paged kernel is fixed per bucket and KV group at capture, planned for the longest
    sequence the engine admits (for a window, the window).

Mixed (``mixed``)
    Decodes and prefill chunks of one step in one forward pass: the decode rows attend
    through the paged kernel, the chunks as in prefill, and the weights are read once.
    It runs eagerly. ``run`` picks among the three by the step's chunks.

With ``debug_checks`` every table, length and slot is checked against the block manager
on the host before it reaches a kernel (``block_manager.check_batch``): the kernels trust
their inputs, and a bad page id reads garbage or kills the CUDA context.

Tensor parallelism
    Each rank has a runner over its shard of the model (``Llama.part``) and its own page
    pool of the same page count, holding its KV heads. Rank 0's runner is the engine's:
    it turns the block manager's tables into a ``PrefillInputs``, ``DecodeInputs`` or
    ``MixedInputs``,
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

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kvpilot.worker.block_manager import BlockManager, KVGroups, check_batch
from kvpilot.worker.kernels import cache as kv_cache
from kvpilot.worker.kernels import cpu as cpu_kernels
from kvpilot.worker.kernels.cpu import dequantize, gather_sequence
from kvpilot.worker.model import Llama, LlamaConfig
from kvpilot.worker.scheduler import Sequence, is_decode

KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": kv_cache.FP8_DTYPE,
             "fp32": torch.float32}


def layer_groups(cfg: LlamaConfig) -> list[int]:
    """The KV group of each layer: 0 for global layers; local (sliding-window) layers
    are group 1, or group 0 where every layer is local. A group is one page pool."""
    local = [cfg.window_of(i) is not None for i in range(cfg.num_layers)]
    if all(local):
        return [0] * cfg.num_layers
    return [1 if x else 0 for x in local]


def ring_pages(cfg: LlamaConfig, page_size: int, max_model_len: int) -> int | None:
    """Pages of the ring a sequence holds in the local layers' pool: the window (or the
    longest sequence, if shorter) rounded up to pages; None without local layers."""
    if cfg.sliding_window is None:
        return None
    return -(-min(cfg.sliding_window, max_model_len) // page_size)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
              *, window: int | None = None, softcap: float | None = None,
              scale: float | None = None, chunk: int = 1024) -> torch.Tensor:
    """Causal attention of queries ``q`` (``[n, Hq, D]``, positions ``q_start ..``) over
    keys and values ``k``, ``v`` (``[m, Hkv, D]``, positions ``k_start ..``, ending
    where the queries end): a query attends to keys at or before it and, with
    ``window``, after ``query - window``. With neither a window, a cap nor earlier keys
    it is one causal ``scaled_dot_product_attention``; else queries go ``chunk`` at a
    time against the keys they can see, so a long prompt in a window never builds a
    ``prompt x prompt`` mask. ``softcap`` scores are computed by hand (float32)."""
    n, hq, d = q.shape
    group = hq // k.shape[1]

    def heads(x):  # [m, Hkv, D] -> [1, Hq, m, D]
        return x.transpose(0, 1).repeat_interleave(group, dim=0)[None]

    if window is None and softcap is None and q_start == k_start:
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], heads(k), heads(v),
                                           is_causal=True, scale=scale)
        return o[0].transpose(0, 1)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        first = q_start + c0 - (window - 1) if window is not None else k_start
        k0, k1 = max(first, k_start) - k_start, q_start + c1 - k_start
        qpos = torch.arange(q_start + c0, q_start + c1, device=q.device)[:, None]
        kpos = torch.arange(k_start + k0, k_start + k1, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        qs, ks, vs = q[c0:c1].transpose(0, 1)[None], heads(k[k0:k1]), heads(v[k0:k1])
        if softcap is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale
            scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            o = torch.matmul(scores, vs.float()).to(q.dtype)
        out[c0:c1] = o[0].transpose(0, 1)
    return out


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
    slots: np.ndarray  # int64 [groups, tokens]: where each token's K/V goes, per KV group
    spans: np.ndarray  # int64 [seqs, 4]: first and end row in ids, first and end position
    tables: list[list[np.ndarray]]  # int64, per group, each sequence's block-table row


@dataclass
class DecodeInputs:
    """One decode step, as every rank runs it: the first ``rows`` entries of rank 0's
    host buffer (``rows`` is the CUDA-graph bucket, or ``n`` when eager) and, per KV
    group, the block table rows of the ``n`` sequences up to the last page any of them
    reads."""

    n: int
    rows: int
    ids: np.ndarray  # int32 [rows]
    positions: np.ndarray
    slots: np.ndarray  # int32 [groups, rows]
    lens: np.ndarray
    table: np.ndarray  # int32 [groups, n, pages]


@dataclass
class MixedInputs:
    """One step of decodes (the first ``decode.n`` tokens) and prefill chunks."""

    decode: DecodeInputs
    prefill: PrefillInputs


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
    def __init__(self, model: Llama, block_manager: KVGroups | BlockManager | None, *,
                 kv_dtype: str, max_model_len: int, max_num_seqs: int, cuda_graphs: bool = True,
                 debug_checks: bool = False, followers: Fanout | None = None,
                 num_pages: list[int] | int | None = None, page_size: int | None = None):
        """``block_manager`` on rank 0 (and at TP 1): the pools of the model's KV groups
        (a bare ``BlockManager`` is one group); a follower rank has none and is given
        each pool's ``num_pages`` and the ``page_size``. ``followers``: rank 0's link to
        the other ranks of a tensor-parallel replica."""
        part = model.part
        cfg = model.cfg
        if isinstance(block_manager, BlockManager):
            block_manager = KVGroups([block_manager])
        self.model = model
        self.bm = block_manager
        self.followers = followers
        self.device = model.device
        self.group_of = layer_groups(cfg)
        self.windows = [cfg.window_of(i) for i in range(cfg.num_layers)]
        groups = max(self.group_of) + 1
        if block_manager is not None:
            if len(block_manager.pools) != groups:
                raise ValueError(f"the model has {groups} KV groups, the block manager "
                                 f"{len(block_manager.pools)} pools")
            self.pools = block_manager.pools
            pages = [p.num_pages for p in self.pools]
            ring = [p.ring_pages for p in self.pools]
        else:
            self.pools = None
            pages = [num_pages] * groups if isinstance(num_pages, int) else list(num_pages)
            ring = [None] * groups
        # A group's ring (its local layers keep their window; kvpilot.worker.block_manager).
        ring_cap = ring_pages(cfg, page_size or block_manager.page_size, max_model_len)
        self.ring = [ring_cap if any(self.windows[i] is not None and self.group_of[i] == g
                                     for i in range(cfg.num_layers)) else None
                     for g in range(groups)]
        if block_manager is not None and ring != self.ring:
            raise ValueError(f"pool rings {ring} are not the model's {self.ring}")
        self.page_size = page_size or block_manager.page_size
        self.group_pages = pages
        self.num_pages = pages[0]
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
        for i in range(cfg.num_layers):
            n = pages[self.group_of[i]]
            if dtype == torch.float32:
                shape = (n, self.page_size, part.num_kv_heads, part.head_dim)
                self.layers.append(kv_cache.LayerKV(torch.zeros(shape), torch.zeros(shape)))
            else:
                self.layers.append(kv_cache.allocate_layer(
                    n, self.page_size, part.num_kv_heads, part.head_dim, dtype, self.device))
        # Of this rank's pool, while every layer keeps a token:
        # kvpilot.api.memory.kv_bytes_per_token(arch, dtype, tp).
        per_layer = 2 * part.num_kv_heads * part.head_dim * self.layers[0].key.element_size()
        self.kv_bytes_per_token = per_layer * cfg.num_layers
        # Per group: bytes one token slot of its pages costs (its layers' K and V).
        self.group_bytes_per_token = [per_layer * self.group_of.count(g) for g in range(groups)]
        self._graphs: dict[int, _Graph] = {}
        self._buckets: list[int] = []  # batch sizes with a graph, ascending
        # Decode inputs, int32, in one buffer: ids, positions, lengths (one per row each),
        # then per KV group its slots (one per row) and block table. The host fills a
        # pinned copy and one transfer moves it; CUDA graphs read the device copy, whose
        # address never changes.
        b, p = max_num_seqs, self.max_pages
        host = torch.zeros(3 * b + groups * (b + b * p), dtype=torch.int32,
                           pin_memory=self.on_gpu)
        dev = host.to(self.device) if self.on_gpu else host

        def views(buf):
            ids, pos, lens = (buf[i * b:(i + 1) * b] for i in range(3))
            slots, tables = [], []
            for g in range(groups):
                at = 3 * b + g * (b + b * p)
                slots.append(buf[at:at + b])
                tables.append(buf[at + b:at + b + b * p].reshape(b, p))
            return ids, pos, lens, slots, tables

        for slots in views(host)[3]:
            slots[:] = -1  # no writes until a row is used
        self._host, self._dev = host, dev
        self._h = views(host.numpy())
        self._ids, self._pos, self._lens, self._slots, self._tables = views(dev)
        # Which page table (the block manager's list, held, so never another) and how many
        # row entries each host row holds, per group: most rows are unchanged from one
        # step to the next.
        self._row_owner: list[list[tuple[list[int], int] | None]] = [[None] * b
                                                                    for _ in range(groups)]
        self.cuda_graphs = self.on_gpu and cuda_graphs
        if self.cuda_graphs:
            self.capture_graphs()

    @property
    def kv_capacity_bytes(self) -> int:
        """Of this rank's pools."""
        return sum(n * self.page_size * b
                   for n, b in zip(self.group_pages, self.group_bytes_per_token))

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
            self._fill_host(inputs)
            self._decode_run(inputs.n, inputs.rows)
        elif isinstance(inputs, MixedInputs):
            self._fill_host(inputs.decode)
            self._mixed_run(inputs.decode.n, inputs.prefill)
        elif isinstance(inputs, ProbeInputs):
            self._probe_run(inputs)
        else:
            raise TypeError(f"not a step: {type(inputs).__name__}")
        self._sync()

    def _fill_host(self, inputs: DecodeInputs) -> None:
        """A follower: rank 0's decode rows into this rank's host buffer."""
        ids, pos, lens, slots, tables = self._h
        r, n = inputs.rows, inputs.n
        ids[:r], pos[:r], lens[:r] = inputs.ids, inputs.positions, inputs.lens
        for g, (sl, table) in enumerate(zip(slots, tables)):
            sl[:r] = inputs.slots[g]
            table[:n, :inputs.table.shape[2]] = inputs.table[g]

    # ---- K/V writes -------------------------------------------------------------------
    def _write(self, layer: kv_cache.LayerKV, k, v, slots) -> None:
        if self.on_gpu:
            kv_cache.reshape_and_cache(k, v, layer, slots)
        else:
            cpu_kernels.reshape_and_cache(k, v, layer.key, layer.value, slots, layer.k_scale,
                                  layer.v_scale)

    def _slots_of(self, g: int, seq: Sequence, start: int, end: int) -> list[int]:
        """Slots of positions ``start .. end-1`` in group ``g``'s pool; -1 (no write) for
        those a ring would overwrite within the same step."""
        pool = self.pools[g]
        keep = 0 if pool.ring_pages is None else end - pool.ring_pages * self.page_size
        return [pool.slot(seq.seq_id, p) if p >= keep else -1 for p in range(start, end)]

    def _rows(self, g: int, seqs: list[Sequence], ends: list[int]) -> list[list[int]]:
        """Group ``g``'s block-table rows of ``seqs``: the page tables, or for a ring its
        pages repeated over the positions before ``ends``."""
        pool = self.pools[g]
        if pool.ring_pages is None:
            return [list(pool.table(s.seq_id)) for s in seqs]
        return [pool.row(s.seq_id, -(-e // self.page_size)) for s, e in zip(seqs, ends)]

    def _check(self, g: int, seqs: list[Sequence], rows: list, lens: list[int],
               writes: list[tuple[int, int, int]]) -> None:
        check_batch(self.pools[g], [s.seq_id for s in seqs], rows, lens, writes)

    # ---- prefill ----------------------------------------------------------------------
    def run(self, seqs: list[Sequence], chunks: list[int]) -> torch.Tensor:
        """One step: sequence ``seqs[i]`` computes ``chunks[i]`` tokens from its
        ``num_computed`` on. Float32 logits ``[len(seqs), vocab]`` of each one's last
        computed token. All decodes (a chunk of one ending the sequence) go through
        ``decode`` (CUDA graphs); otherwise one forward pass carries the decodes first,
        then the prefill chunks (``mixed``)."""
        decode = [is_decode(s, c) for s, c in zip(seqs, chunks)]
        if all(decode):
            return self.decode(seqs)
        if not any(decode):
            return self.prefill(seqs, chunks)
        order = [i for i, d in enumerate(decode) if d] + [i for i, d in enumerate(decode) if not d]
        logits = self.mixed([seqs[i] for i in order if decode[i]],
                            [seqs[i] for i in order if not decode[i]],
                            [chunks[i] for i in order if not decode[i]])
        out = torch.empty_like(logits)
        out[torch.tensor(order, device=logits.device)] = logits
        return out

    def prefill(self, seqs: list[Sequence], chunks: list[int] | None = None) -> torch.Tensor:
        """Compute tokens ``num_computed .. num_computed + chunk - 1`` of each sequence (by
        default up to its end); logits of each one's last computed token, float32
        ``[len(seqs), vocab]``."""
        inputs = self._prefill_inputs(seqs, chunks)
        return self._fan_out(inputs, lambda: self._prefill_run(inputs))

    def _prefill_inputs(self, seqs: list[Sequence], chunks: list[int] | None = None
                        ) -> PrefillInputs:
        ids, pos, spans = [], [], []
        groups = range(len(self.pools))
        slots: list[list[int]] = [[] for _ in groups]
        if chunks is None:
            chunks = [len(s) - s.num_computed for s in seqs]
        for s, chunk in zip(seqs, chunks):
            start, end = s.num_computed, s.num_computed + chunk
            ids += s.tokens[start:end]
            pos += range(start, end)
            for g in groups:
                slots[g] += self._slots_of(g, s, start, end)
            spans.append((len(ids) - (end - start), len(ids), start, end))
        ends = [int(e) for _, _, _, e in spans]
        tables = [self._rows(g, seqs, ends) for g in groups]
        if self.debug_checks:
            for g in groups:
                self._check(g, seqs, tables[g], ends,
                            [(s.seq_id, p, sl) for s, (t0, t1, a, b) in zip(seqs, spans)
                             for p, sl in zip(range(a, b), slots[g][t0:t1])])
        return PrefillInputs(
            ids=np.asarray(ids, dtype=np.int64), positions=np.asarray(pos, dtype=np.int64),
            slots=np.asarray(slots, dtype=np.int64).reshape(len(groups), -1),
            spans=np.asarray(spans, dtype=np.int64),
            tables=[[np.asarray(row, dtype=np.int64) for row in t] for t in tables])

    @torch.inference_mode()
    def _prefill_run(self, inp: PrefillInputs) -> torch.Tensor:
        dev = self.device
        input_ids = torch.from_numpy(inp.ids).to(dev)
        positions = torch.from_numpy(inp.positions).to(dev)
        hidden = self.model.forward(input_ids, positions, self._prefill_attend(inp))
        last = torch.tensor([t1 - 1 for _, t1, _, _ in inp.spans.tolist()], dtype=torch.long,
                            device=dev)
        return self.model.logits(hidden[last])

    def _prefill_attend(self, inp: PrefillInputs):
        """The attention of a prefill step's tokens, layer by layer (``model.Attend``)."""
        dev = self.device
        cfg = self.model.cfg
        slot_t = torch.from_numpy(inp.slots).to(dev)
        tables = [[torch.from_numpy(t).to(dev) for t in rows] for rows in inp.tables]
        spans = inp.spans.tolist()

        def attend(i, q, k, v):
            layer, g, window = self.layers[i], self.group_of[i], self.windows[i]
            # What each sequence attends to beyond its new tokens is read back from the
            # pages first (a cached prefix, or a window's earlier tokens), before this
            # step's writes, which in a ring may overwrite it.
            earlier = []
            for (t0, t1, start, end), table in zip(spans, tables[g]):
                first = 0 if window is None else max(0, start - window + 1)
                if start == first:
                    earlier.append(None)
                    continue
                ks = gather_sequence(layer.key, table, start, first)
                vs = gather_sequence(layer.value, table, start, first)
                earlier.append((first, dequantize(ks, layer.k_scale).to(q.dtype),
                                dequantize(vs, layer.v_scale).to(q.dtype)))
            self._write(layer, k, v, slot_t[g])
            out = torch.empty_like(q)
            for (t0, t1, start, end), before in zip(spans, earlier):
                ks, vs, k_start = k[t0:t1], v[t0:t1], start
                if before is not None:
                    k_start = before[0]
                    ks, vs = torch.cat([before[1], ks]), torch.cat([before[2], vs])
                out[t0:t1] = attention(q[t0:t1], ks, vs, start, k_start, window=window,
                                       softcap=cfg.attn_softcap, scale=cfg.attn_scale)
            return out

        return attend

    # ---- decodes and prefill chunks in one pass ---------------------------------------
    def mixed(self, decodes: list[Sequence], prefills: list[Sequence],
              chunks: list[int]) -> torch.Tensor:
        """One forward pass over the last token of each of ``decodes`` (the paged decode
        kernel, eager) and the chunks of ``prefills``: the weights are read once for
        both. Logits ``[len(decodes) + len(prefills), vocab]``, decodes first."""
        n = len(decodes)
        self._decode_inputs(decodes, n)
        pre = self._prefill_inputs(prefills, chunks)
        inputs = None
        if self.followers is not None:
            inputs = MixedInputs(self._decode_message(n, n), pre)
        return self._fan_out(inputs, lambda: self._mixed_run(n, pre))

    @torch.inference_mode()
    def _mixed_run(self, n: int, pre: PrefillInputs) -> torch.Tensor:
        dev = self.device
        if self.on_gpu:
            self._dev.copy_(self._host, non_blocking=True)
        ids, pos, slots, tables, lens = self._decode_args(n)
        input_ids = torch.cat([ids.long(), torch.from_numpy(pre.ids).to(dev)])
        positions = torch.cat([pos.long(), torch.from_numpy(pre.positions).to(dev)])
        decode = self._decode_attend(slots, tables, lens, None)
        prefill = self._prefill_attend(pre)

        def attend(i, q, k, v):
            return torch.cat([decode(i, q[:n], k[:n], v[:n]), prefill(i, q[n:], k[n:], v[n:])])

        hidden = self.model.forward(input_ids, positions, attend)
        last = torch.tensor([n + t1 - 1 for _, t1, _, _ in pre.spans.tolist()],
                            dtype=torch.long, device=dev)
        return self.model.logits(torch.cat([hidden[:n], hidden[last]]))

    # ---- decode -----------------------------------------------------------------------
    def _decode_inputs(self, seqs: list[Sequence], rows: int) -> None:
        """Fill the host buffer for one decode step, padded to ``rows`` (padding rows have
        length 0 and slot -1: nothing read, nothing written)."""
        ids, pos, lens, slots, tables = self._h
        n, ps = len(seqs), self.page_size
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=n)
        ids[:n] = [s.tokens[-1] for s in seqs]
        lens[:n] = lengths
        pos[:n] = lengths - 1
        ids[n:rows] = pos[n:rows] = lens[n:rows] = 0
        last = lengths - 1
        for g, (pool, table, owners) in enumerate(zip(self.pools, tables, self._row_owner)):
            ring = pool.ring_pages
            for r, s in enumerate(seqs):
                pages = pool.table(s.seq_id)
                # Entries the kernel reads: the pages, or a ring repeated up to the length.
                want = len(pages) if ring is None else -(-len(s) // ps)
                owner = owners[r]
                start = owner[1] if owner is not None and owner[0] is pages else 0
                if start == want:
                    continue
                if start > want:
                    start = 0
                table[r, start:want] = (pages[start:want] if ring is None
                                        else [pages[i % ring] for i in range(start, want)])
                owners[r] = (pages, want)
            slots[g][n:rows] = -1
            slots[g][:n] = table[np.arange(n), last // ps] * ps + last % ps
            if self.debug_checks:  # what is handed over, not what should have been
                held = [len(pool.table(s.seq_id)) if ring is None else -(-len(s) // ps)
                        for s in seqs]
                self._check(g, seqs, [table[r, :m].tolist() for r, m in enumerate(held)],
                            lens[:n].tolist(),
                            [(s.seq_id, int(pos[r]), int(slots[g][r])) for r, s in enumerate(seqs)])

    def _decode_forward(self, ids, pos, slots, tables, lens, num_splits):
        """``slots`` and ``tables`` per KV group; ``num_splits`` per group, or None."""
        attend = self._decode_attend(slots, tables, lens, num_splits)
        return self.model.logits(self.model.forward(ids, pos, attend))

    def _decode_attend(self, slots, tables, lens, num_splits):
        """The attention of one token per sequence over its pages (``model.Attend``)."""
        from kvpilot.worker.kernels.paged_attention import paged_attention_decode

        cfg = self.model.cfg

        def attend(i, q, k, v):
            layer, g, window = self.layers[i], self.group_of[i], self.windows[i]
            self._write(layer, k, v, slots[g])
            if not self.on_gpu:
                return cpu_kernels.paged_attention(q, layer.key, layer.value, tables[g], lens,
                                           k_scale=layer.k_scale, v_scale=layer.v_scale,
                                           sm_scale=cfg.attn_scale, window=window,
                                           softcap=cfg.attn_softcap).to(q.dtype)
            return paged_attention_decode(q, layer.key, layer.value, tables[g], lens,
                                          k_scale=layer.k_scale, v_scale=layer.v_scale,
                                          sm_scale=cfg.attn_scale, window=window,
                                          softcap=cfg.attn_softcap,
                                          max_seq_len=self.max_model_len,
                                          num_splits=num_splits and num_splits[g])

        return attend

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute the last token of each sequence; float32 logits ``[len(seqs), vocab]``."""
        n = len(seqs)
        bucket = next((b for b in self._buckets if b >= n), None)
        rows = bucket or n
        self._decode_inputs(seqs, rows)
        inputs = self._decode_message(n, rows) if self.followers is not None else None
        return self._fan_out(inputs, lambda: self._decode_run(n, rows))

    def _decode_message(self, n: int, rows: int) -> DecodeInputs:
        """The host buffer's first ``rows`` rows, for the other ranks."""
        ids, pos, lens, slots, tables = self._h
        pages = -(-int(lens[:n].max()) // self.page_size)
        return DecodeInputs(n, rows, ids[:rows].copy(), pos[:rows].copy(),
                            np.stack([sl[:rows] for sl in slots]), lens[:rows].copy(),
                            np.stack([t[:n, :pages] for t in tables]))

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
        return self._decode_forward(*self._decode_args(n), None)

    def _decode_args(self, n: int) -> tuple:
        return (self._ids[:n], self._pos[:n], [sl[:n] for sl in self._slots],
                [t[:n] for t in self._tables], self._lens[:n])

    def capture_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket, largest first, sharing one
        memory pool. Each is run eagerly once first (Triton compiles, and the paged
        kernel learns its occupancy, which fixes the split count of each KV group)."""
        from kvpilot.worker.kernels.paged_attention import plan_num_splits

        part = self.model.part
        pool = torch.cuda.graph_pool_handle()
        first_of = [self.group_of.index(g) for g in range(len(self.group_pages))]
        with torch.inference_mode():
            for b in reversed(graph_buckets(self.max_num_seqs)):
                q = torch.empty(b, part.num_heads, part.head_dim, dtype=self.model.dtype,
                                device=self.device)
                args = self._decode_args(b)
                self._decode_forward(*args, None)  # compile, learn occupancy
                splits = [plan_num_splits(q, self.layers[i].key, self._tables[g][:b],
                                          max_seq_len=self.max_model_len,
                                          window=self.windows[i])
                          for g, i in enumerate(first_of)]
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
