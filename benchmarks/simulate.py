"""The fleet simulator's target run: a mixed fleet of 12 Models under a bursty trace,
kvpilot against count-based scheduling and a static fleet provisioned for the peak,
every strategy on the same trace, in two scenarios:

* **met**: every Model's ``maxReplicas`` raised to 64 and the fleet doubled (176
  GPUs), so that neither a Model's cap nor the fleet binds any strategy (the time any
  Model's desired count sat at its cap, and the fleet passes that left a replica
  unplaced, are printed per strategy, so nothing is excluded silently);
* **capped**: the Models' own bounds (4 to 8 replicas), where several Models' peaks
  need more replicas than their cap allows, so no scaler can meet every SLA.

    python benchmarks/simulate.py                     # both scenarios (one hour each)
    python benchmarks/simulate.py --scenario met      # one of them
    python benchmarks/simulate.py --minutes 10        # shorter
    python benchmarks/simulate.py --plots DIR         # and PNG plots

kvpilot: replicas share GPUs by their HBM budgets, each worker's KV pool is its
budget, ``autoscale()`` on KV pressure (target 75%), waiting requests, the TTFT and
ITL targets and the demand trend projected a start-up ahead. Count-based: whole GPUs
per replica (placement with sharing off, as the device plugin schedules), each
worker's KV pool 90% of its GPUs as vLLM sizes it, KubeAI's rule on active requests
with ``targetRequests`` = concurrentSequences x 0.75 (the same headroom) over a 60 s
moving average, scale-down after 30 s. Static: kvpilot's placement with, for every
Model, the most replicas the kvpilot run had at any time, from the start and never
scaled. Start-up: download (when the node's cache lacks the weights), load and graph
capture, from ``kvpilot.simulator.startup`` (estimates until measured on a GPU), or
``--startup-seconds`` for every start.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kvpilot.api.gpus import CATALOG  # noqa: E402
from kvpilot.api.model import Model  # noqa: E402
from kvpilot.operator.placement import Node  # noqa: E402
from kvpilot.simulator.engine import (  # noqa: E402
    Settings, count_based, kvpilot, simulate, static,
)
from kvpilot.simulator.report import plot, summarize, table  # noqa: E402
from kvpilot.simulator.trace import Shape, Workload, generate  # noqa: E402

from machine import hardware  # noqa: E402  (beside this script)
from architectures import MODELS as ARCH  # noqa: E402  (beside this script)

# Model name: (architecture, kv dtype, context, sequences, TTFT ms, ITL ms, maxReplicas,
#              requests/s, median prompt, median output, long-context share)
MODELS = {
    "chat-small": ("qwen2.5-0.5b", "bf16", 4096, 16, 500, 50, 8, 3.0, 600, 200, 0.02),
    "assist-1b": ("llama-3.2-1b", "bf16", 8192, 16, 500, 50, 8, 2.0, 1000, 250, 0.02),
    "assist-3b": ("llama-3.2-3b", "bf16", 8192, 16, 1000, 50, 8, 1.5, 1000, 250, 0.02),
    "code-7b": ("qwen2.5-7b", "bf16", 16384, 8, 1000, 60, 8, 1.0, 2000, 150, 0.05),
    "rag-7b": ("mistral-7b", "fp8", 32768, 4, 2000, 80, 8, 0.3, 6000, 300, 0.10),
    "chat-8b": ("llama-3-8b", "bf16", 8192, 16, 1000, 60, 8, 2.0, 1000, 300, 0.02),
    "chat-9b": ("gemma-2-9b", "bf16", 8192, 8, 1000, 80, 8, 0.8, 1000, 250, 0.02),
    "agent-14b": ("qwen2.5-14b", "bf16", 16384, 8, 2000, 80, 8, 0.6, 3000, 200, 0.05),
    "reason-32b": ("qwen2.5-32b", "fp8", 16384, 8, 3000, 100, 6, 0.4, 2000, 500, 0.02),
    "chat-70b": ("llama-3.1-70b", "fp8", 8192, 16, 3000, 100, 4, 0.5, 1200, 300, 0.02),
    "batch-3b": ("llama-3.2-3b", "fp8", 32768, 4, 5000, 100, 6, 0.2, 8000, 400, 0.10),
    "draft-1b": ("llama-3.2-1b", "bf16", 2048, 32, 300, 40, 8, 4.0, 300, 60, 0.0),
}

FLEET = [("h100", "NVIDIA-H100-80GB-HBM3", 8, 6), ("h200", "NVIDIA-H200", 8, 2),
         ("a100", "NVIDIA-A100-SXM4-80GB", 8, 2), ("l40s", "NVIDIA-L40S", 4, 2)]


def fleet(times: int = 1) -> list[Node]:
    return [Node(f"{name}-{i}", product, gpus, CATALOG[product].hbm_bytes)
            for name, product, gpus, count in FLEET for i in range(count * times)]


# Scenario: (maxReplicas of every Model, None: its own from MODELS; the fleet's nodes
# times this). The met scenario doubles the fleet, so that count-based scheduling (a
# whole GPU or more per replica) is not bound by the fleet either.
SCENARIOS = {"met": (64, 2), "capped": (None, 1)}


def models(spread: str = "none", max_replicas: int | None = None) -> list[Model]:
    out = []
    for name, (arch, kv, ctx, seqs, ttft, itl, hi, *_rest) in MODELS.items():
        hi = max_replicas or hi
        params, layers, heads, kv_heads, hd, max_ctx = ARCH[arch]
        out.append(Model.model_validate({
            "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model", "metadata": {"name": name},
            "spec": {
                "weights": {"parameters": params, "dtype": "bf16"},
                "architecture": {"layers": layers, "attentionHeads": heads,
                                 "kvHeads": kv_heads, "headDim": hd,
                                 "maxContextTokens": max_ctx},
                "kvCacheDtype": kv,
                "sla": {"contextTokens": ctx, "concurrentSequences": seqs,
                        "ttftMilliseconds": ttft, "interTokenLatencyMilliseconds": itl},
                "replicas": 1, "minReplicas": 1, "maxReplicas": hi,
                "runtimeOverhead": "1Gi" if params < 2e9 else "2Gi",
                "autoscaling": {"enabled": True, "targetKvPressurePercent": 75},
                "placement": {"spread": spread},
            },
        }))
    return out


def trace(minutes: float, seed: int, load: float = 1.0):
    work = [Workload(name, rate * load, ctx, prompt, output=out, long_share=long)
            for name, (_a, _k, ctx, _s, _t, _i, _h, rate, prompt, out, long) in MODELS.items()]
    # A ramp from the trough to the peak of a 2-hour day over the first hour, and per
    # Model bursts of 4x its rate for 3 minutes, twice an hour on average.
    shape = Shape(diurnal=0.5, period=7200, bursts_per_hour=2, burst_factor=4,
                  burst_seconds=180)
    return generate(work, minutes * 60, shape, seed)


def run(scenario: str, args, reqs) -> list:
    """Every strategy on one trace; prints the scenario's tables, returns the results."""
    cap, times = SCENARIOS[scenario]
    nodes, ms = fleet(times), models(args.spread, cap)
    gpus = sum(n.gpus for n in nodes)
    caps = (f"maxReplicas {cap}" if cap else "each Model's own maxReplicas (4-8)") \
        + f", fleet x{times}"
    print(f"\n## scenario {scenario}: {caps}")
    print(f"# {len(reqs)} requests over {args.minutes:.0f} min, {len(ms)} models, "
          f"{len(nodes)} nodes / {gpus} GPUs, start-up "
          + (f"{args.startup_seconds:.0f} s" if args.startup_seconds is not None
             else "modelled (download if not cached + load + graphs)")
          + f", load x{args.load:g}, seed {args.seed}, spread {args.spread}")
    settings = Settings(startup_seconds=args.startup_seconds,
                        headroom_seconds=args.headroom_seconds)
    results, summaries = [], []
    peak = None
    for strategy in ("kvpilot", "count-based", "static-peak"):
        st = kvpilot() if strategy == "kvpilot" else count_based() \
            if strategy == "count-based" else static(peak)
        started = time.perf_counter()
        r = simulate(nodes, ms, reqs, st, settings)
        seconds = time.perf_counter() - started
        if strategy == "kvpilot":
            peak = r.peak_replicas
        results.append(r)
        summaries.append(summarize(r))
        print(f"# {strategy}: simulated in {seconds:.1f} s; reconcile rounds with a desired "
              f"replica unplaced: {r.unplaced_rounds}")
    print(table(summaries), end="")
    k, c = summaries[0], summaries[1]
    saved = 1 - k.gpu_hours / c.gpu_hours
    print(f"kvpilot vs count-based: {100 * saved:.1f}% fewer GPU-hours; SLA attainment "
          f"{100 * k.attainment:.2f}% vs {100 * c.attainment:.2f}%")
    print("peak replicas (kvpilot): " + ", ".join(f"{m} {n}" for m, n in peak.items()))
    per_model: dict[str, list[int]] = {}
    for i, req in enumerate(reqs):
        per_model.setdefault(req.model, []).append(i)
    print(f"{'MODEL':<12} {'CAP':>3} " + " ".join(
        f"{s.strategy + ' SLA':>17} {'AT CAP':>7}" for s in summaries)
        + f" {'STARTS (CACHED) MEAN S':>23}")
    cap = {m.metadata.name: m.spec.replica_ceiling for m in ms}
    for name, idx in per_model.items():
        cells = []
        for r in results:
            sub = summarize(replace(r, requests=[r.requests[i] for i in idx],
                                    first_token=[r.first_token[i] for i in idx],
                                    finish=[r.finish[i] for i in idx],
                                    rejected=[r.rejected[i] for i in idx],
                                    preempted=[r.preempted[i] for i in idx]))
            cells.append(f"{100 * sub.attainment:>16.2f}% {r.at_cap[name]:>6.0f}s")
        n, cached, mean = results[0].starts[name]
        print(f"{name:<12} {cap[name]:>3} " + " ".join(cells)
              + f" {n:>9} ({cached:>3}) {mean:>6.0f} s")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=(*SCENARIOS, "both"), default="both")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=float, default=4.0,
                    help="every Model's request rate times this (default 4)")
    ap.add_argument("--startup-seconds", type=float, default=None,
                    help="every start takes this long (default: the start-up model)")
    ap.add_argument("--headroom-seconds", type=float, default=60.0,
                    help="autoscale()'s look-ahead (the operator's "
                         "scaleUpHeadroomSeconds; 0: none)")
    ap.add_argument("--spread", choices=("none", "gpu", "node"), default="none",
                    help="every Model's placement.spread (default none: packed, as the "
                         "figures in docs/simulator.md; node is a Model's own default)")
    ap.add_argument("--plots", type=Path)
    args = ap.parse_args()
    reqs = trace(args.minutes, args.seed, args.load)
    print(f"# {hardware()}")
    for scenario in (SCENARIOS if args.scenario == "both" else (args.scenario,)):
        results = run(scenario, args, reqs)
        if args.plots:
            for path in plot(results, args.plots / scenario):
                print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
