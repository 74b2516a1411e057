"""Paged-attention decode kernel: time, KV bytes read per second, and the baselines.

    python benchmarks/decode_kernel.py                       # the table (needs a CUDA GPU)
    python benchmarks/decode_kernel.py --sweep configs,l2     # and diagnostics after it

For each (batch, context) of Llama-3-8B attention (32 query heads, 8 KV heads, head dim
128) with pages of 16 tokens in a shuffled pool, bf16 and FP8 (e4m3, per-head scales)
KV, it prints the kernel's launch shape and split count, its time and KV bytes read /
time, torch SDPA (``enable_gqa=True``) on the same values laid out contiguously in
bf16, a read-bandwidth ceiling measured in the same run, and the ratios: kernel / SDPA
speedup, kernel GB/s / ceiling, FP8 kernel / bf16 kernel speedup; and the relative
error of the kernel against float32 SDPA on the same (dequantized) values. Decode
attention is bandwidth-bound, so GB/s against the ceiling is the figure of merit.

Timing: each measured call gets its own copy of the inputs, rotating through enough
copies (>= 512 MiB together) that no call finds its KV in L2 from a previous one. The
calls are captured in a CUDA graph and the graph's replays are timed with CUDA events,
for the kernel and for SDPA alike, so Python launch overhead is not counted for either
(a decode engine replays graphs too); the median of several replays is reported. The
``eager`` diagnostic times single calls, launched one by one with L2 flushed, instead.

Diagnostics (``--sweep``, comma-separated): ``configs`` (launch shapes), ``splits``
(split counts by hand), ``merge`` (the merge kernel alone), ``l2`` (KV that stays in L2:
the compute side's rate), ``eager`` (per-call timing and host time), ``paging``
(shuffled vs in-order block tables), ``pagedread`` (the decode's pages read alone
through the block table, against the kernel and SDPA), ``variants`` (bf16 launch shapes
against the default and SDPA, same inputs, same run), ``scaling`` (time against bytes at
a fixed batch: fixed cost and streaming rate of the kernel and of SDPA).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT / "operator")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvpilot.worker.kernels.bandwidth import paged_read, stream_read  # noqa: E402
from kvpilot.worker.kernels.cache import FP8_DTYPE, allocate_pages  # noqa: E402
from kvpilot.worker.kernels import paged_attention as pa  # noqa: E402
from kvpilot.worker.kernels.paged_attention import (  # noqa: E402
    DecodeConfig,
    default_config_for,
    paged_attention_decode,
    plan_num_splits,
)
from kvpilot.worker.kernels.cpu import quantize_fp8  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CONFIGS = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (32, 4096), (64, 2048),
           (16, 32768), (128, 1024)]
LONG, WIDE = (1, 32768), (16, 32768)  # the sweep's split-count and L2-resident shapes
ROTATE_BYTES = 512 << 20
ORDERS = ("head", "head")  # physical order of K and V pages (kvpilot.worker.kernels.cache)


def kv_name(kv_dtype: torch.dtype) -> str:
    """The benchmark's two cache dtypes by name: "fp8" or "bf16"."""
    return "fp8" if kv_dtype == FP8_DTYPE else "bf16"


def kv_elt(kv_dtype: torch.dtype) -> int:
    """Bytes per cached element."""
    return 1 if kv_dtype == FP8_DTYPE else 2


def kv_bytes(batch: int, ctx: int, elt: int) -> int:
    """K and V of every token of every sequence, read once."""
    return 2 * batch * ctx * KV_HEADS * HEAD_DIM * elt


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def time_eager(fn, reps: int = 200) -> float:
    """Median microseconds of single calls, launched one by one, with L2 flushed before
    each by zeroing 256 MiB (what ``triton.testing.do_bench`` does)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def time_rotating(calls, reps: int = 5, target_ms: float = 20.0) -> float:
    """Median microseconds of one call: `calls` (one per input copy) captured in a graph."""
    for fn in calls:  # warm-up: compile, allocate
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in calls:
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call = start.elapsed_time(end) / len(calls)
    loops = max(1, min(200, math.ceil(target_ms / max(per_call * len(calls), 1e-3))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up on the capture stream
            fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(loops):
                for fn in calls:
                    fn()
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (loops * len(calls)))
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# Read ceiling: the fastest of a Triton streaming read and torch's sum, over 4 GiB
# --------------------------------------------------------------------------------------
def read_ceiling(log) -> float:
    """GB/s of the best plain read of 4 GiB (decimal GB, as everywhere here)."""
    n = 1 << 30  # float32: 4 GiB
    x = torch.randn(n, device="cuda")
    nbytes = x.numel() * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = 0.0
    for block, per_sm, warps in ((4096, 4, 8), (8192, 2, 8), (4096, 8, 4), (2048, 16, 4)):
        grid = sms * per_sm
        out = torch.empty(grid, device="cuda")
        us = time_rotating([lambda: stream_read(x, out, block=block, num_warps=warps)], reps=5)
        gbs = nbytes / us / 1e3
        log(f"  read ceiling: triton read BLOCK={block} grid={per_sm}xSM warps={warps}: "
            f"{us:8.1f} us {gbs:7.0f} GB/s")
        best = max(best, gbs)
    if torch.cuda.get_device_capability()[0] >= 9:  # rows copied by the tensor-memory accelerator
        for block, per_sm, warps, stages in ((8192, 2, 4, 3), (8192, 2, 4, 4), (4096, 4, 4, 4),
                                             (16384, 1, 8, 3)):
            grid = sms * per_sm
            out = torch.empty(grid, device="cuda")
            us = time_rotating([lambda: stream_read(x, out, block=block, num_warps=warps,
                                                    tma=True, num_stages=stages)], reps=5)
            gbs = nbytes / us / 1e3
            log(f"  read ceiling: triton TMA read BLOCK={block} grid={per_sm}xSM warps={warps} "
                f"stages={stages}: {us:8.1f} us {gbs:7.0f} GB/s")
            best = max(best, gbs)
    us = time_rotating([lambda: x.sum()], reps=5)
    gbs = nbytes / us / 1e3
    log(f"  read ceiling: torch.sum: {us:8.1f} us {gbs:7.0f} GB/s")
    best = max(best, gbs)
    y = torch.empty(n // 2, device="cuda")
    us = time_rotating([lambda: y.copy_(x[: n // 2])], reps=5)
    log(f"  (for comparison) device copy of 2 GiB: {us:8.1f} us "
        f"{2 * nbytes / 2 / us / 1e3:7.0f} GB/s read+write")
    x = y = None  # free the GPU memory before the next case
    torch.cuda.empty_cache()
    return best


# --------------------------------------------------------------------------------------
# Inputs: `copies` independent batches in one shuffled page pool, and the same values
# contiguous for SDPA
# --------------------------------------------------------------------------------------
@dataclass
class Inputs:
    q: list
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    tables: list
    seq_lens: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    kv_bytes: int  # per call


def build_inputs(batch, ctx, kv_dtype, copies, orders, gen):
    pages_per_seq = ctx // PAGE
    num_pages = copies * batch * pages_per_seq
    k_pages = allocate_pages(num_pages, PAGE, KV_HEADS, HEAD_DIM, kv_dtype, "cuda",
                             order=orders[0])
    v_pages = allocate_pages(num_pages, PAGE, KV_HEADS, HEAD_DIM, kv_dtype, "cuda",
                             order=orders[1])
    k_scale = v_scale = None
    # Fill page by page in chunks (random normal, never zeros).
    chunk = max(1, (256 << 20) // (PAGE * KV_HEADS * HEAD_DIM * 4))
    if kv_dtype == FP8_DTYPE:
        k_scale = torch.full((KV_HEADS,), 4.0 / 448, device="cuda")  # per head
        v_scale = torch.full((KV_HEADS,), 4.0 / 448, device="cuda")
    for p0 in range(0, num_pages, chunk):
        p1 = min(num_pages, p0 + chunk)
        for pages, scale in ((k_pages, k_scale), (v_pages, v_scale)):
            vals = torch.randn(p1 - p0, PAGE, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
            pages[p0:p1] = quantize_fp8(vals, scale) if scale is not None else vals.to(kv_dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    tables = [perm[c * batch * pages_per_seq:(c + 1) * batch * pages_per_seq]
              .view(batch, pages_per_seq).contiguous() for c in range(copies)]
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = [torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
         for _ in range(copies)]
    return Inputs(q, k_pages, v_pages, tables, seq_lens, k_scale, v_scale,
                  kv_bytes(batch, ctx, k_pages.element_size()))


def contiguous_copy(inp: Inputs, c: int):
    """Copy `c`'s K/V as contiguous bf16 [batch, kv_heads, ctx, head_dim] for SDPA."""
    table = inp.tables[c].long()
    batch, pages_per_seq = table.shape

    def gather(pages, scale):
        # Index raw bytes: gathers need not support float8.
        raw = pages.view(torch.uint8) if pages.element_size() == 1 else pages
        x = raw[table.reshape(-1)].view(pages.dtype)
        x = x.reshape(batch, pages_per_seq * PAGE, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if scale is not None:
            x = x.float() * scale[None, :, None, None]
        return x.to(torch.bfloat16).contiguous()

    return gather(inp.k_pages, inp.k_scale), gather(inp.v_pages, inp.v_scale)


def kernel_calls(inp: Inputs, cfg: DecodeConfig | None, outs):
    return [
        (lambda c=c: paged_attention_decode(
            inp.q[c], inp.k_pages, inp.v_pages, inp.tables[c], inp.seq_lens,
            k_scale=inp.k_scale, v_scale=inp.v_scale, config=cfg, out=outs[c]))
        for c in range(len(inp.q))
    ]


def time_default(batch, ctx, kv_dtype, gen, orders=ORDERS):
    """Inputs of one shape (as many copies as defeat L2), their outputs, and the
    microseconds of one call of the launcher's default."""
    elt = kv_elt(kv_dtype)
    inp = build_inputs(batch, ctx, kv_dtype, copies_for(batch, ctx, elt), orders, gen)
    outs = [torch.empty_like(q) for q in inp.q]
    return inp, outs, time_rotating(kernel_calls(inp, None, outs))


def sdpa_calls(inp: Inputs, kv, backend=None):
    qs = [q[:, :, None, :] for q in inp.q]

    def call(c):
        k, v = kv[c]
        if backend is None:
            return F.scaled_dot_product_attention(qs[c], k, v, enable_gqa=True)
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qs[c], k, v, enable_gqa=True)

    return [lambda c=c: call(c) for c in range(len(qs))]


def time_sdpa(inp: Inputs, reps: int = 5) -> float:
    """Microseconds of one bf16 SDPA call on contiguous copies of the values of ``inp``,
    one per input copy."""
    kv = [contiguous_copy(inp, c) for c in range(len(inp.q))]
    return time_rotating(sdpa_calls(inp, kv), reps=reps)


def copies_for(batch, ctx, elt):
    per = kv_bytes(batch, ctx, elt)
    return max(1, min(64, math.ceil(ROTATE_BYTES / per)))


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------
def bench_table(log, ceiling, gen, orders):
    rows = []
    for batch, ctx in CONFIGS:
        bf16_us = None
        for kv_dtype in (torch.bfloat16, FP8_DTYPE):
            inp, outs, us = time_default(batch, ctx, kv_dtype, gen, orders)
            copies = len(inp.q)
            gbs = inp.kv_bytes / us / 1e3
            splits = plan_num_splits(inp.q[0], inp.k_pages, inp.tables[0])
            cfg = default_config_for(inp.q[0], inp.k_pages)
            # SDPA on the same (dequantized) values, contiguous, bf16.
            sdpa_copies = copies_for(batch, ctx, 2)
            kv = [contiguous_copy(inp, c % copies) for c in range(min(copies, sdpa_copies))]
            while len(kv) < sdpa_copies:  # bf16 needs copies of its own to defeat L2
                kv.append(tuple(t.clone() for t in kv[len(kv) % copies]))
            sdpa_in = Inputs([inp.q[c % copies] for c in range(sdpa_copies)], None, None,
                             None, None, None, None, 0)
            sdpa_us = time_rotating(sdpa_calls(sdpa_in, kv))
            sdpa_bytes = kv_bytes(batch, ctx, 2)
            sdpa_gbs = sdpa_bytes / sdpa_us / 1e3
            n = min(batch, 2)  # float32 reference on the first sequences only
            ref = F.scaled_dot_product_attention(inp.q[0][:n, :, None, :].float(),
                                                 kv[0][0][:n].float(), kv[0][1][:n].float(),
                                                 enable_gqa=True)[:, :, 0, :]
            err = rel_err(outs[0][:n], ref)
            fp8_speedup = (bf16_us / us) if bf16_us is not None else None
            if kv_dtype != FP8_DTYPE:
                bf16_us = us
            row = dict(batch=batch, ctx=ctx, dtype=kv_name(kv_dtype),
                       splits=splits, cfg=label(cfg), us=us, gbs=gbs, sdpa_us=sdpa_us, sdpa_gbs=sdpa_gbs,
                       speedup=sdpa_us / us, pct=100 * gbs / ceiling, fp8=fp8_speedup,
                       err=err, mib=inp.kv_bytes / 2**20)
            rows.append(row)
            log(fmt_row(row))
            inp = kv = outs = sdpa_in = None  # free the GPU memory before the next case
            torch.cuda.empty_cache()
    return rows


HEADER = (f"{'B':>4} {'S':>7} {'kv':>4} {'MiB':>7} {'bn/w/st':>8} {'splits':>6} {'kernel us':>10} "
          f"{'GB/s':>7} {'SDPA us':>9} {'SDPA GB/s':>9} {'x SDPA':>7} {'%ceil':>6} "
          f"{'fp8/bf16':>8} {'rel err':>8}")


def fmt_row(r):
    fp8 = f"{r['fp8']:.2f}x" if r["fp8"] is not None else "-"
    return (f"{r['batch']:>4} {r['ctx']:>7} {r['dtype']:>4} {r['mib']:>7.0f} {r['cfg']:>8} {r['splits']:>6} "
            f"{r['us']:>10.1f} {r['gbs']:>7.0f} {r['sdpa_us']:>9.1f} {r['sdpa_gbs']:>9.0f} "
            f"{r['speedup']:>6.2f}x {r['pct']:>5.1f}% {fp8:>8} {r['err']:>8.1e}")


# --------------------------------------------------------------------------------------
# Sweep: launch shapes, split targets, layouts, SDPA backends
# --------------------------------------------------------------------------------------
SWEEP_LAUNCH = {
    "bf16": [DecodeConfig(64, 4, 4), DecodeConfig(32, 1, 4), DecodeConfig(32, 2, 4),
             DecodeConfig(64, 4, 3), DecodeConfig(32, 1, 3)],
    "fp8": [DecodeConfig(32, 1, 3), DecodeConfig(64, 2, 3), DecodeConfig(32, 1, 4),
            DecodeConfig(16, 1, 3), DecodeConfig(32, 1, 2),
            # V converted by hand (the default where DRAM is slow for the SMs: H100)
            DecodeConfig(16, 1, 3, convert_v=True), DecodeConfig(16, 1, 4, convert_v=True),
            DecodeConfig(32, 1, 3, convert_v=True), DecodeConfig(16, 2, 3, convert_v=True),
            DecodeConfig(16, 1, 3, convert_v=True, maxnreg=128)],
}


def sweep(log, gen, parts):
    """Launch shapes, split counts, and where the time goes (diagnostics, not the table)."""
    launches = ((torch.bfloat16, SWEEP_LAUNCH["bf16"]), (FP8_DTYPE, SWEEP_LAUNCH["fp8"]))
    for kv_dtype, launch in launches if "configs" in parts else ():
        elt = kv_elt(kv_dtype)
        for batch, ctx in CONFIGS:
            inp = build_inputs(batch, ctx, kv_dtype, copies_for(batch, ctx, elt), ORDERS, gen)
            outs = [torch.empty_like(q) for q in inp.q]
            for cfg in launch:
                try:
                    us = time_rotating(kernel_calls(inp, cfg, outs), reps=3)
                except Exception as e:  # out of resources etc.: say so, go on
                    log(f"  sweep B={batch} S={ctx} {cfg}: failed {type(e).__name__}: "
                        f"{str(e)[:100]}")
                    continue
                splits = plan_num_splits(inp.q[0], inp.k_pages, inp.tables[0], config=cfg)
                occ = pa._OCCUPANCY.get(pa._occupancy_key(inp.q[0], inp.k_pages, cfg))
                log(f"  sweep {kv_name(kv_dtype):4} B={batch:>3} S={ctx:>6} "
                    f"{label(cfg):>9} maxnreg={cfg.maxnreg} occ={occ} splits={splits:>3}: "
                    f"{us:8.1f} us {inp.kv_bytes / us / 1e3:6.0f} GB/s")
            inp = outs = None  # free the GPU memory before the next case
            torch.cuda.empty_cache()
    # Split counts by hand.
    for kv_dtype in (torch.bfloat16, FP8_DTYPE) if "splits" in parts else ():
        elt = kv_elt(kv_dtype)
        for batch, ctx, counts in ((1, 32768, (16, 33, 66, 128, 132, 256)),
                                   (1, 131072, (33, 66, 132, 256)),
                                   (32, 4096, (1, 2, 4)), (16, 32768, (1, 2, 4, 8)),
                                   (128, 1024, (1, 2)), (64, 2048, (1, 2))):
            inp = build_inputs(batch, ctx, kv_dtype, copies_for(batch, ctx, elt), ORDERS, gen)
            outs = [torch.empty_like(q) for q in inp.q]
            line = f"  splits {kv_name(kv_dtype):4} B={batch} S={ctx}:"
            for splits in counts:
                calls = [(lambda c=c: paged_attention_decode(
                    inp.q[c], inp.k_pages, inp.v_pages, inp.tables[c], inp.seq_lens,
                    k_scale=inp.k_scale, v_scale=inp.v_scale, num_splits=splits, out=outs[c]))
                    for c in range(len(inp.q))]
                us = time_rotating(calls, reps=3)
                line += f" {splits}:{us:.1f}"
            log(line + " (splits:us)")
            inp = outs = None  # free the GPU memory before the next case
            torch.cuda.empty_cache()
    # The merge alone: 32 query heads x 8, 33 and 132 splits (the last two: bf16 and FP8
    # at B = 1), the launcher's shape against whole heads 32 splits at a time.
    if "merge" not in parts:
        return
    outm = [torch.empty(1, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(8)]
    for splits in (8, 33, 132):
        part = torch.randn(1, Q_HEADS, splits, HEAD_DIM, device="cuda")
        lse = torch.randn(1, Q_HEADS, splits, device="cuda")
        line = f"  merge kernel alone (1 x {Q_HEADS} heads x {splits} splits):"
        for block_s, block_d in (pa.merge_shape(splits, HEAD_DIM), (32, HEAD_DIM)):
            us = time_rotating([lambda o=o: pa._merge_splits_kernel[
                (1, Q_HEADS, HEAD_DIM // block_d)](
                part, lse, o, splits, o.stride(0), o.stride(1), HEAD_DIM=HEAD_DIM,
                BLOCK_S=block_s, BLOCK_D=block_d, PDL=False, num_warps=4) for o in outm], reps=3)
            line += f" BLOCK_S={block_s} BLOCK_D={block_d}: {us:.1f} us;"
        log(line)


# Launch shapes compared against the default in one run (`variants`).
VARIANTS = [DecodeConfig(64, 4, 4), DecodeConfig(64, 4, 3), DecodeConfig(64, 4, 3, swap=True),
            DecodeConfig(64, 4, 2, swap=True), DecodeConfig(32, 1, 4), DecodeConfig(64, 2, 4)]
VARIANT_SHAPES = [(1, 131072), (32, 4096), (64, 2048), (16, 32768), (128, 1024), (1, 32768),
                  (8, 4096)]


def label(cfg: DecodeConfig) -> str:
    """tile/warps/stages, "v" where V is converted by hand, "s" where the products are
    swapped."""
    return (f"{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}" + ("v" if cfg.convert_v else "")
            + ("s" if cfg.swap else ""))


def compare_variants(log, gen, kv_dtype, variants):
    """The default launch shape, each of `variants`, the default again (the spread of
    the same code) and bf16 SDPA, on the same inputs in the same run."""
    elt = kv_elt(kv_dtype)
    name = f"{kv_name(kv_dtype):4}"
    for batch, ctx in VARIANT_SHAPES:
        copies = copies_for(batch, ctx, elt)
        inp = build_inputs(batch, ctx, kv_dtype, copies, ORDERS, gen)
        outs = [torch.empty_like(q) for q in inp.q]
        kv = [contiguous_copy(inp, c) for c in range(copies)]
        sdpa = time_rotating(sdpa_calls(inp, kv), reps=5)
        n = min(batch, 2)
        ref = F.scaled_dot_product_attention(inp.q[0][:n, :, None, :].float(),
                                             kv[0][0][:n].float(), kv[0][1][:n].float(),
                                             enable_gqa=True)[:, :, 0, :]
        results = []
        for cfg in [None] + variants + [None]:
            tag = "default" if cfg is None else label(cfg)
            try:
                for o in outs:
                    o.fill_(float("nan"))
                us = time_rotating(kernel_calls(inp, cfg, outs), reps=5)
            except Exception as e:  # out of resources etc.: say so, go on
                log(f"  variant {name} B={batch} S={ctx} {tag}: failed {type(e).__name__}: "
                    f"{str(e)[:100]}")
                continue
            err = rel_err(outs[0][:n], ref)
            splits = plan_num_splits(inp.q[0], inp.k_pages, inp.tables[0], config=cfg)
            results.append((tag, us, splits, err))
            log(f"  variant {name} B={batch:>3} S={ctx:>6} {tag:>16}: splits={splits:>3} "
                f"{us:8.1f} us {inp.kv_bytes / us / 1e3:6.0f} GB/s  x SDPA {sdpa / us:5.3f}  "
                f"rel err {err:.1e}")
        best = min(results, key=lambda r: r[1])
        log(f"  variants {name} B={batch} S={ctx}: SDPA {sdpa:.1f} us; default "
            f"{results[0][1]:.1f} / {results[-1][1]:.1f} us; best {best[0]} {best[1]:.1f} us "
            f"(x SDPA {sdpa / best[1]:.3f}, x default {results[0][1] / best[1]:.3f})")
        inp = outs = kv = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()


def diagnose(log, gen, parts):
    """Where the time goes: the compute side alone (L2-resident KV) and paging's cost."""
    # Compute-side rate: every block-table entry points into 64 pages that stay in L2.
    for kv_dtype in (torch.bfloat16, FP8_DTYPE) if "l2" in parts else ():
        inp = build_inputs(*WIDE, kv_dtype, 1, ORDERS, gen)
        for c, t in enumerate(inp.tables):
            inp.tables[c] = (t % 64).contiguous()
        outs = [torch.empty_like(q) for q in inp.q]
        for cfg in [None] + SWEEP_LAUNCH[kv_name(kv_dtype)][:4]:
            us = time_rotating(kernel_calls(inp, cfg, outs), reps=3)
            name = "default" if cfg is None else f"bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages}"
            log(f"  L2-resident {kv_name(kv_dtype):4} B={WIDE[0]} "
                f"S={WIDE[1]} {name}: {us:8.1f} us = "
                f"{WIDE[0] * WIDE[1] * KV_HEADS / us / 1e3:.1f} G token-heads/s "
                f"({inp.kv_bytes / us / 1e3:.0f} GB/s equivalent)")
        inp = outs = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
    # Timed call by call (no graph: launch overhead included), L2 flushed before each.
    for batch, ctx in ((1, 4096), (1, 32768), (16, 32768)) if "eager" in parts else ():
        inp = build_inputs(batch, ctx, torch.bfloat16, 1, ORDERS, gen)
        out = torch.empty_like(inp.q[0])
        k, v = contiguous_copy(inp, 0)
        q4 = inp.q[0][:, :, None, :]
        kern = time_eager(lambda: paged_attention_decode(
            inp.q[0], inp.k_pages, inp.v_pages, inp.tables[0], inp.seq_lens, out=out))
        sdpa = time_eager(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
        # Host time per call: enqueue 200 calls back to back, no sync in between.
        host = {}
        for name, fn in (("kernel", lambda: paged_attention_decode(
                inp.q[0], inp.k_pages, inp.v_pages, inp.tables[0], inp.seq_lens, out=out)),
                         ("SDPA", lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            host[name] = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
        log(f"  eager (L2 flushed) bf16 B={batch:>3} S={ctx:>6}: kernel {kern:7.1f} us "
            f"({inp.kv_bytes / kern / 1e3:5.0f} GB/s), SDPA {sdpa:7.1f} us "
            f"({inp.kv_bytes / sdpa / 1e3:5.0f} GB/s); host time per call: kernel "
            f"{host['kernel']:.1f} us, SDPA {host['SDPA']:.1f} us")
        inp = k = v = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
    # What paging costs: the same pool read through shuffled vs in-order block tables,
    # and in order from a pool laid out head-outermost ([kv_heads, pages, page, dim]),
    # where each program streams one contiguous run as SDPA does.
    for kv_dtype in (torch.bfloat16, FP8_DTYPE) if "paging" in parts else ():
        elt = kv_elt(kv_dtype)
        for batch, ctx in ((1, 131072), (16, 32768), (128, 1024)):
            inp = build_inputs(batch, ctx, kv_dtype, copies_for(batch, ctx, elt), ORDERS, gen)
            outs = [torch.empty_like(q) for q in inp.q]
            shuffled = time_rotating(kernel_calls(inp, None, outs), reps=3)
            n = inp.tables[0].numel()
            for c in range(len(inp.tables)):
                inp.tables[c] = torch.arange(c * n, (c + 1) * n, dtype=torch.int32,
                                             device="cuda").view_as(inp.tables[c])
            in_order = time_rotating(kernel_calls(inp, None, outs), reps=3)
            for name in ("k_pages", "v_pages"):
                pages = getattr(inp, name)
                pool = torch.empty((KV_HEADS, *pages.shape[:2], HEAD_DIM), dtype=pages.dtype,
                                   device="cuda")
                pool.view(torch.uint8).copy_(pages.view(torch.uint8).permute(2, 0, 1, 3))
                setattr(inp, name, pool.permute(1, 2, 0, 3))
                pages = None  # free the GPU memory before the next case
            streamed = time_rotating(kernel_calls(inp, None, outs), reps=3)
            line = (f"  block table {kv_name(kv_dtype):4} B={batch:>3} S={ctx:>6}: "
                    f"shuffled {shuffled:7.1f} us ({inp.kv_bytes / shuffled / 1e3:5.0f} GB/s), "
                    f"in order {in_order:7.1f} us ({inp.kv_bytes / in_order / 1e3:5.0f} GB/s), "
                    f"in order head-outermost {streamed:7.1f} us "
                    f"({inp.kv_bytes / streamed / 1e3:5.0f} GB/s)")
            if elt == 2:
                sdpa = time_sdpa(inp, reps=3)
                line += (f"; SDPA {sdpa:7.1f} us ({inp.kv_bytes / sdpa / 1e3:5.0f} GB/s, "
                         f"x head-outermost {streamed / sdpa:.3f})")
            log(line)
            inp = outs = None  # free the GPU memory before the next case
            torch.cuda.empty_cache()

    # What reading the pages alone costs: the decode's exact bytes, split as it splits,
    # read through the same shuffled block table and summed, with none of its math.
    # The best launch of it bounds any paged decode on this cache.
    for batch, ctx in TARGET_SHAPES if "pagedread" in parts else ():
        inp = build_inputs(batch, ctx, torch.bfloat16, copies_for(batch, ctx, 2), ORDERS, gen)
        outs = [torch.empty_like(q) for q in inp.q]
        sdpa = time_sdpa(inp)
        kernel = time_rotating(kernel_calls(inp, None, outs), reps=5)
        units, sms = batch * KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count
        reads = {}
        for step, warps, stages, per_sm in PAGED_READS:
            splits = pa.choose_num_splits(units, ctx, step * PAGE, sms * per_sm)
            sums = torch.empty(units * splits, device="cuda")
            name = f"{step}p/{warps}w/{stages}st x{splits}"
            reads[name] = time_rotating([lambda c=c: paged_read(
                inp.k_pages, inp.v_pages, inp.tables[c], inp.seq_lens, sums, num_splits=splits,
                pages_per_step=step, num_warps=warps, num_stages=stages)
                for c in range(len(inp.q))], reps=5)
        best = min(reads, key=reads.get)
        gbs = {k: inp.kv_bytes / us / 1e3 for k, us in reads.items()}
        log(f"  paged read bf16 B={batch:>3} S={ctx:>6}: SDPA {sdpa:7.1f} us "
            f"({inp.kv_bytes / sdpa / 1e3:5.0f} GB/s); kernel {kernel:7.1f} us (x SDPA "
            f"{sdpa / kernel:.3f}); best read {best}: {reads[best]:7.1f} us "
            f"({gbs[best]:5.0f} GB/s, x SDPA {sdpa / reads[best]:.3f}, kernel / read "
            f"{reads[best] / kernel:.3f}); all reads (GB/s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in gbs.items()))
        inp = outs = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()


# The shapes of the bf16 targets (B x S >= 64K tokens) and paged-read launches to try:
# (pages per step, warps, stages, programs per SM the split count assumes).
TARGET_SHAPES = ((64, 2048), (128, 1024), (32, 4096), (16, 32768), (1, 131072))
PAGED_READS = ((4, 4, 3, 2), (4, 4, 4, 2), (8, 8, 3, 1), (2, 1, 4, 4), (4, 4, 2, 2))


SCALING = ((16, (4096, 8192, 16384, 32768)), (1, (16384, 32768, 65536, 131072)))


def scaling(log, gen):
    """Time against bytes at a fixed batch, for the kernel (bf16, FP8) and bf16 SDPA: the
    least-squares line ``us = fixed + bytes / rate`` splits a call into a fixed cost
    (launches, first loads, tail, merge) and a streaming rate."""
    for batch, ctxs in SCALING:
        points = {"bf16 kernel": [], "fp8 kernel": [], "SDPA": []}
        for ctx in ctxs:
            for kv_dtype in (torch.bfloat16, FP8_DTYPE):
                elt = kv_elt(kv_dtype)
                inp, _, us = time_default(batch, ctx, kv_dtype, gen)
                points[f"{kv_name(kv_dtype)} kernel"].append((inp.kv_bytes, us))
                line = (f"  scaling B={batch:>3} S={ctx:>6} {kv_name(kv_dtype):4}: "
                        f"kernel {us:8.1f} us {inp.kv_bytes / us / 1e3:6.0f} GB/s")
                if elt == 2:
                    sdpa = time_sdpa(inp)
                    points["SDPA"].append((inp.kv_bytes, sdpa))
                    line += f"; SDPA {sdpa:8.1f} us {inp.kv_bytes / sdpa / 1e3:6.0f} GB/s"
                log(line)
                inp = _ = None  # free the GPU memory before the next case
                torch.cuda.empty_cache()
        for name, pts in points.items():
            slope, fixed = statistics.linear_regression([b for b, _ in pts], [u for _, u in pts])
            worst = max(abs(fixed + slope * b - u) for b, u in pts)
            log(f"  scaling B={batch} {name:>11}: fixed {fixed:6.1f} us + streaming at "
                f"{1e-3 / slope:6.0f} GB/s (largest residual {worst:.1f} us)")


def report_compiled(log):
    """Registers, spills and shared memory of every decode-kernel variant compiled here."""
    for fn in (pa._paged_decode_kernel, pa._merge_splits_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for key, kernel in cache[0].items():
                meta = getattr(kernel, "metadata", None)
                log(f"  {fn.__name__}: regs={getattr(kernel, 'n_regs', '?')} "
                    f"spills={getattr(kernel, 'n_spills', '?')} "
                    f"shared={getattr(meta, 'shared', '?')} "
                    f"warps={getattr(meta, 'num_warps', '?')} stages={getattr(meta, 'num_stages', '?')}"
                    f" key={str(key)[-160:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="", help="comma list of diagnostics to run after "
                        "the table: configs, splits, merge, l2, eager, paging, pagedread, variants, "
                        "scaling")
    parser.add_argument("--no-table", action="store_true", help="diagnostics only")
    parser.add_argument("--k-order", default=ORDERS[0], help="physical order of K pages")
    parser.add_argument("--v-order", default=ORDERS[1], help="physical order of V pages")
    parser.add_argument("--out", type=Path, help="also write the log to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sink = args.out.open("w") if args.out else None

    def log(line=""):
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    props = torch.cuda.get_device_properties(0)
    log(f"GPU: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"triton {importlib.metadata.version('triton')}")
    log(f"Llama-3-8B attention: {Q_HEADS} query heads, {KV_HEADS} KV heads, head dim {HEAD_DIM}, "
        f"page {PAGE}, K/V pages {args.k_order}/{args.v_order}-major, shuffled pool")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ceiling = read_ceiling(log)
    log(f"read ceiling (best of the above): {ceiling:.0f} GB/s")
    log()
    parts = set(filter(None, args.sweep.split(",")))
    rows = []
    if not args.no_table:
        log(HEADER)
        rows = bench_table(log, ceiling, gen, (args.k_order, args.v_order))
    sweep(log, gen, parts)
    diagnose(log, gen, parts)
    if "scaling" in parts:
        scaling(log, gen)
    if "variants" in parts:
        compare_variants(log, gen, torch.bfloat16, VARIANTS)
    log()
    log("compiled variants:")
    report_compiled(log)
    log()
    log(f"GPU: {props.name}; read ceiling {ceiling:.0f} GB/s; GB = 1e9 bytes; KV bytes = "
        "K and V of every token read once")
    log(HEADER)
    for r in rows:
        log(fmt_row(r))
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
