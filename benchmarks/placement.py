"""Placement quality and speed: kvpilot's place() against the exact optimum, an LP lower
bound and count-based scheduling (whole GPUs per replica, least-allocated spreading), and
what keeping a Model's replicas apart (spec.placement.spread gpu/node) costs in GPUs
against packing them (none), on the same instances.

    python benchmarks/placement.py            # everything
    python benchmarks/placement.py --quick    # fewer instances, shorter ILP limit

Instances are generated from fixed seeds in four shapes, so that no one shape can be
tuned to: mixed fleets of H100-80GB, H200, A100-40GB, A100-80GB, L40S and L4 nodes with
any model mix; TP-heavy mixes (Qwen2.5-32B, Llama-3.1-70B) on a few large nodes; small
nodes (1-4 GPUs) with small models; and infeasible mixes (demand above the fleet's HBM).
Models get context SLAs and, half of them, an inter-token latency target, sized with
the memory and step-time models.
Every plan, the engine's and the ILP's, is checked (no GPU oversubscribed, TP groups on
one node, allowed products only) before it is counted.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kvpilot.api.model import ModelSpec  # noqa: E402
from kvpilot.api.gpus import CATALOG  # noqa: E402
from kvpilot.operator.placement import (  # noqa: E402
    Demand, Node, Policy, Snapshot, demand_for, place,
)
from kvpilot.operator.placement.check import violations  # noqa: E402
from kvpilot.operator.placement.exact import lp_bound, solve  # noqa: E402

from machine import hardware  # noqa: E402  (beside this script)
from architectures import MODELS  # noqa: E402  (beside this script)
SMALL = [m for m, p in MODELS.items() if p[0] < 9e9]
SLAS = [(2048, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 4), (32768, 4), (32768, 8)]
LARGE = ["qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b", "mistral-7b"]
# product: GPUs per node (choices)
SHAPES = {
    "NVIDIA-H100-80GB-HBM3": (8,),
    "NVIDIA-H200": (8,),
    "NVIDIA-A100-SXM4-80GB": (8,),
    "NVIDIA-A100-SXM4-40GB": (8,),
    "NVIDIA-L40S": (1, 2, 4),
    "NVIDIA-L4": (1, 2, 4, 8),
}
SMALL_SHAPES = {"NVIDIA-L4": (1, 2), "NVIDIA-L40S": (1, 2, 4), "NVIDIA-A100-SXM4-40GB": (1, 2)}
LARGE_SHAPES = {"NVIDIA-H100-80GB-HBM3": (8,), "NVIDIA-H200": (8,)}
GiB = 2**30


def spec(rng: random.Random, name: str, itl: bool = False) -> ModelSpec:
    params, layers, heads, kv, hd, max_ctx = MODELS[name]
    ctx, seqs = rng.choice([s for s in SLAS if s[0] <= max_ctx])
    sla = {"contextTokens": ctx, "concurrentSequences": seqs}
    if itl and rng.random() < 0.5:
        sla["interTokenLatencyMilliseconds"] = rng.choice([15, 20, 30, 50])
    return ModelSpec.model_validate({
        "weights": {"parameters": params, "dtype": "bf16"},
        "architecture": {"layers": layers, "attentionHeads": heads, "kvHeads": kv,
                         "headDim": hd, "maxContextTokens": max_ctx},
        "kvCacheDtype": rng.choice(["bf16", "bf16", "fp8"]),
        "sla": sla,
        "runtimeOverhead": "1Gi" if params < 2e9 else "2Gi",
    })


def fleet(rng: random.Random, nodes: int, gpus: int | None = None,
          shapes: dict = SHAPES) -> Snapshot:
    products = list(shapes)
    out = []
    for i in range(nodes):
        p = rng.choice(products)
        n = gpus or rng.choice(shapes[p])
        out.append(Node(f"n{i:04d}", p, n, CATALOG[p].hbm_bytes))
    return Snapshot(nodes=tuple(out))


def workload(rng: random.Random, snap: Snapshot, policy: Policy, models: list[str],
             kinds: int, fill: float | None = None, replicas: int | None = None,
             gpus: float | None = None, itl: bool = False) -> list[Demand]:
    """``kinds`` models from ``models`` with random SLAs (and, with ``itl``, half of them
    an ITL target); replica counts scaled until the demand is ``fill`` of the fleet's
    HBM, or whole-GPU requests are ``gpus`` of its GPUs, or the replicas total
    ``replicas``."""
    chosen = [rng.choice(models) for _ in range(kinds)] if kinds > len(models) else \
        rng.sample(models, kinds)
    demands = []
    for i, name in enumerate(chosen):
        d = demand_for(f"{name}-{i}", spec(rng, name, itl), snap, policy, replicas=1)
        if d.requirements:
            demands.append(d)
    weights = [rng.uniform(0.5, 2.0) for _ in demands]
    if replicas is None:
        if gpus is not None:
            target = sum(n.gpus for n in snap.nodes) * gpus
            per = [min(r.tp for r in d.requirements.values()) for d in demands]
        else:
            target = sum(n.gpus * n.gpu_hbm for n in snap.nodes) * (fill or 0.5)
            per = [min(r.total for r in d.requirements.values()) for d in demands]
        scale = target / sum(w * p for w, p in zip(weights, per))
        counts = [max(1, round(w * scale)) for w in weights]
    else:
        total = sum(weights)
        counts = [max(1, round(replicas * w / total)) for w in weights]
        counts[0] += replicas - sum(counts)
    return [Demand(d.model, c, d.requirements, d.products, d.unfit, d.spec)
            for d, c in zip(demands, counts)]


def count_based(snap: Snapshot, demands: list[Demand]) -> tuple[int, int]:
    """(replicas placed, GPUs used) when each replica takes whole GPUs
    (``nvidia.com/gpu: tp``) on the least-allocated node that has them, in submission
    order, as kube-scheduler does; the TP a replica asks for is the one the memory model
    gives for the node's product (a generous baseline: users rarely know it)."""
    free = [n.gpus if n.schedulable else 0 for n in snap.nodes]
    placed = used = 0
    for d in demands:
        reqs = [(i, d.requirement(n.product)) for i, n in enumerate(snap.nodes)]
        reqs = [(i, r) for i, r in reqs if r is not None]
        for _ in range(d.replicas):
            best, best_score = None, -1.0
            for i, r in reqs:
                if free[i] >= r.tp:
                    score = (free[i] - r.tp) / snap.nodes[i].gpus
                    if score > best_score:
                        best, best_score = (i, r), score
            if best is None:
                continue
            free[best[0]] -= best[1].tp
            placed += 1
            used += best[1].tp
    return placed, used


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def checked(snap, demands, policy, plan) -> None:
    bad = violations(snap, demands, policy, plan)
    if bad:
        raise SystemExit(f"invalid plan: {bad[:3]}")


KINDS = ("mixed", "tp-heavy", "small nodes", "infeasible")


def exact_instance(n: int, seed: int):
    """Seed s of size n: the shape is KINDS[s % 4]."""
    rng = random.Random(1000 * n + seed)
    kind = KINDS[seed % len(KINDS)]
    if kind == "tp-heavy":
        snap = fleet(rng, max(1, n // 4), shapes=LARGE_SHAPES)
        models, fill = LARGE, rng.uniform(0.4, 0.9)
    elif kind == "small nodes":
        snap = fleet(rng, n, shapes=SMALL_SHAPES)
        models, fill = SMALL, rng.uniform(0.3, 0.85)
    elif kind == "infeasible":
        snap = fleet(rng, n)
        models, fill = list(MODELS), rng.uniform(1.05, 1.4)
    else:
        snap = fleet(rng, n)
        models, fill = list(MODELS), rng.uniform(0.3, 0.85)
    demands = workload(rng, snap, Policy(), models, kinds=rng.randint(3, 6), fill=fill,
                       itl=True)
    return kind, snap, demands


def bench_exact(sizes: list[int], seeds: int, limit: float) -> None:
    print(f"\n## GPUs and replicas vs the exact optimum (ILP, HiGHS, {limit:.0f} s limit per "
          "instance)")
    print("Memory and bandwidth (ITL) constraints both; ratio = kvpilot GPUs / optimum GPUs "
          "where both place every replica.")
    print(f"{'nodes':>5} {'seed':>4} {'shape':<11} {'GPUs':>5} {'repl':>5} {'placed':>7} "
          f"{'ILP pl':>6} {'kvpilot':>7} {'ILP':>5} {'status':>10} {'ratio':>6} {'ILP s':>6} "
          f"{'ours s':>6}")
    policy = Policy()
    solved, fewer = [], 0
    proven = 0
    for n in sizes:
        for seed in range(seeds):
            kind, snap, demands = exact_instance(n, seed)
            total = sum(d.replicas for d in demands)
            t = time.perf_counter()
            plan = place(snap, demands, policy)
            ours = time.perf_counter() - t
            checked(snap, demands, policy, plan)
            print(f"  solving {n} nodes, seed {seed} ...", file=sys.stderr, flush=True)
            ex = solve(snap, demands, policy, time_limit=limit)
            if ex.plan is not None:
                checked(snap, demands, policy, ex.plan)
            both = plan.complete and ex.placed == ex.demanded
            ratio = plan.gpus_used / ex.gpus_used if both and ex.gpus_used else float("nan")
            gpus = sum(x.gpus for x in snap.nodes)
            print(f"{n:>5} {seed:>4} {kind:<11} {gpus:>5} {total:>5} {len(plan.assignments):>7} "
                  f"{ex.placed:>6} {plan.gpus_used:>7} "
                  f"{ex.gpus_used if ex.gpus_used is not None else '-':>5} {ex.status:>10} "
                  f"{ratio:>6.3f} {ex.seconds:>6.1f} {ours:>6.3f}", flush=True)
            if ex.optimal:
                proven += 1
                fewer += len(plan.assignments) < ex.placed
                if both:
                    solved.append((plan.gpus_used, ex.gpus_used))
    print(f"proven optimal: {proven} instances; kvpilot placed fewer replicas than the "
          f"optimum on {fewer}")
    if solved:
        used = sum(p for p, _ in solved)
        opt = sum(o for _, o in solved)
        within = sum(1 for p, o in solved if p <= 1.03 * o)
        exact = sum(1 for p, o in solved if p == o)
        worst = max(p / o for p, o in solved)
        print(f"of those, all replicas placed by both: {len(solved)}; kvpilot {used} GPUs vs "
              f"optimum {opt}: {used / opt:.3f} overall, worst instance {worst:.3f}; optimal "
              f"on {exact}, within 1.03 on {within}")


def memory_only(demands: list[Demand]) -> list[Demand]:
    """The same demands with no ITL budget: packing by memory alone."""
    return [replace(d, requirements={p: replace(r, step_budget=None)
                                     for p, r in d.requirements.items()}) for d in demands]


def itl_misses(snap: Snapshot, demands: list[Demand], plan) -> int:
    """Replicas of ``plan`` on a GPU whose tenants stream more per decode step than the
    replica's own ITL budget (from ``demands``) allows."""
    streamed: dict[tuple[str, int], int] = {}
    for a in plan.assignments:
        for g in a.gpus:
            streamed[(a.node, g)] = streamed.get((a.node, g), 0) + a.step_bytes
    product = {n.name: n.product for n in snap.nodes}
    by_model = {d.model: d for d in demands}
    misses = 0
    for a in plan.assignments:
        req = by_model[a.model].requirement(product[a.node])
        if req is not None and req.step_budget is not None and any(
                streamed[(a.node, g)] > req.step_budget for g in a.gpus):
            misses += 1
    return misses


def bench_itl(nodes: int, seeds: int) -> None:
    print(f"\n## Memory-only packing vs memory + bandwidth ({nodes} nodes, half the models "
          "with an ITL target)")
    print(f"{'seed':>4} {'repl':>5} {'with ITL':>8} {'GPUs':>6} {'mem-only':>8} {'GPUs':>6} "
          f"{'missed ITL (mem-only)':>22}")
    for seed in range(seeds):
        rng = random.Random(500 + seed)
        snap = fleet(rng, nodes)
        demands = workload(rng, snap, Policy(), list(MODELS), kinds=8,
                           fill=rng.uniform(0.3, 0.7), itl=True)
        plan = place(snap, demands)
        checked(snap, demands, Policy(), plan)
        loose = memory_only(demands)
        blind = place(snap, loose)
        targets = sum(d.replicas for d in demands
                      if any(r.step_budget is not None for r in d.requirements.values()))
        print(f"{seed:>4} {sum(d.replicas for d in demands):>5} {len(plan.assignments):>8} "
              f"{plan.gpus_used:>6} {len(blind.assignments):>8} {blind.gpus_used:>6} "
              f"{itl_misses(snap, demands, blind):>12} of {targets:>5} "
              f"(with ITL: {itl_misses(snap, demands, plan)})", flush=True)


def bench_baseline(nodes: int, seeds: int) -> None:
    print(f"\n## GPUs used vs count-based scheduling ({nodes} nodes; LP lower bound beside)")
    print("Count-based: each replica takes its TP degree in whole GPUs on the least-allocated "
          "node.\nWorkloads ask for 40-70% of the fleet's GPUs in whole-GPU terms.")
    print(f"{'mix':<6} {'seed':>4} {'repl':>5} {'kvpilot':>7} {'count':>6} {'saved':>6} "
          f"{'LP':>7} {'vs LP':>6}")
    policy = Policy()
    for mix, models in (("small", SMALL), ("all", list(MODELS))):
        saved_all = []
        for seed in range(seeds):
            rng = random.Random(7 * seed + len(mix))
            snap = fleet(rng, nodes)
            demands = workload(rng, snap, policy, models, kinds=rng.randint(4, 8),
                               gpus=rng.uniform(0.4, 0.7))
            plan = place(snap, demands, policy)
            checked(snap, demands, policy, plan)
            placed, used = count_based(snap, demands)
            total = sum(d.replicas for d in demands)
            lp = lp_bound(snap, demands, policy)
            note = ""
            if placed < total or not plan.complete:
                note = f"  (placed: kvpilot {len(plan.assignments)}, count {placed} of {total})"
            else:
                saved_all.append(1 - plan.gpus_used / used)
            vs_lp = plan.gpus_used / lp if lp else float("nan")
            print(f"{mix:<6} {seed:>4} {total:>5} {plan.gpus_used:>7} {used:>6} "
                  f"{1 - plan.gpus_used / used:>6.1%} {_num(lp):>7} {vs_lp:>6.3f}{note}",
                  flush=True)
        if saved_all:
            print(f"{mix}: GPUs saved vs count-based, mean {statistics.mean(saved_all):.1%}, "
                  f"least {min(saved_all):.1%} (instances where both place everything)")


def bench_speed(nodes: int, gpus: int, replicas: int, repeat: int) -> None:
    print(f"\n## Planning time: {nodes} nodes x {gpus} GPUs, {replicas} replicas, 12 models")
    rng = random.Random(42)
    snap = fleet(rng, nodes, gpus=gpus)
    for label, policy, models, spread in (
            ("pack, all models", Policy(), list(MODELS), "none"),
            ("pack, small models", Policy(), SMALL, "none"),
            ("spread, all models", Policy.spread(), list(MODELS), "none"),
            ("pack, spread node", Policy(), list(MODELS), "node")):
        t = time.perf_counter()
        demands = spread_as(workload(random.Random(43), snap, policy, models, kinds=12,
                                     replicas=replicas), spread)
        t_demands = time.perf_counter() - t
        times = []
        for i in range(repeat):
            print(f"  {label}: run {i + 1}/{repeat} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            plan = place(snap, demands, policy)
            times.append(time.perf_counter() - t)
        checked(snap, demands, policy, plan)
        lp = lp_bound(snap, demands, policy)
        _, used = count_based(snap, demands)
        print(f"{label:<19} place(): median {statistics.median(times):.3f} s "
              f"({statistics.median(times):.2f} x the 1 s target), best "
              f"{min(times):.3f} s, worst {max(times):.3f} s of {repeat} (demands from the "
              f"memory model {t_demands:.3f} s); placed {len(plan.assignments)}/"
              f"{sum(d.replicas for d in demands)} on {plan.gpus_used} GPUs "
              f"(LP bound {_num(lp)}, count-based {used})", flush=True)


def bench_many_models(nodes: int, models: int) -> None:
    print(f"\n## Planning time: {nodes} nodes x 8 GPUs, {models} Models of one replica each")
    rng = random.Random(44)
    snap = fleet(rng, nodes, gpus=8)
    policy = Policy()
    t = time.perf_counter()
    demands = workload(random.Random(45), snap, policy, list(MODELS), kinds=models,
                       replicas=models)
    demands = [replace(d, replicas=1) for d in demands]
    t_demands = time.perf_counter() - t
    t = time.perf_counter()
    plan = place(snap, demands, policy)
    took = time.perf_counter() - t
    checked(snap, demands, policy, plan)
    _, used = count_based(snap, demands)
    print(f"place(): {took:.3f} s ({took / 2.0:.2f} x the 2 s target; demands {t_demands:.3f} s); "
          f"placed {len(plan.assignments)}/{len(demands)} on {plan.gpus_used} GPUs "
          f"(count-based {used}: {plan.gpus_used / used:.3f} x)", flush=True)


SPREADS = ("none", "gpu", "node")


def spread_as(demands: list[Demand], spread: str) -> list[Demand]:
    return [replace(d, spread=spread) for d in demands]


def bench_spread(sizes: list[int], seeds: int, nodes: int, big_seeds: int,
                 exact_limit: float) -> None:
    """What spreading costs in GPUs: each instance planned three times, its models
    spreading by none (packing), gpu and node; nothing else differs."""
    print("\n## Spread vs pack: GPUs with load for the same demands (spec.placement.spread "
          "none / gpu / node)")
    print("crowded: models some of whose replicas share a node (GPU) because none without "
          "one has room.\nexact: the ILP's optimum with every model held to one replica per "
          f"node (GPU), {exact_limit:.0f} s limit, where place() crowds none.")
    print(f"{'nodes':>5} {'seed':>4} {'shape':<12} {'repl':>5} {'GPUs none':>9} {'gpu':>5} "
          f"{'node':>5} {'placed n/g/n':>13} {'crowded g/n':>11} {'exact g/n':>11} "
          f"{'secs n/g/n':>15}")

    def row(label: str, n: int, seed: int, snap, demands, exact: bool) -> tuple:
        gpus, placed, crowded, secs, opt = [], [], [], [], []
        for spread in SPREADS:
            ds = spread_as(demands, spread)
            t = time.perf_counter()
            plan = place(snap, ds, Policy())
            secs.append(time.perf_counter() - t)
            checked(snap, ds, Policy(), plan)
            gpus.append(plan.gpus_used)
            placed.append(len(plan.assignments))
            crowded.append(len(plan.crowded))
            if spread != "none":
                ex = solve(snap, ds, Policy(), time_limit=exact_limit) if (
                    exact and not plan.crowded) else None
                opt.append("-" if ex is None or ex.plan is None else
                           f"{ex.gpus_used}{'' if ex.optimal else '*'}"
                           if ex.placed == len(plan.assignments) else f"({ex.placed} pl)")
        total = sum(d.replicas for d in demands)
        print(f"{n:>5} {seed:>4} {label:<12} {total:>5} {gpus[0]:>9} {gpus[1]:>5} {gpus[2]:>5} "
              f"{'/'.join(map(str, placed)):>13} {'/'.join(map(str, crowded[1:])):>11} "
              f"{'/'.join(opt):>11} {'/'.join(f'{x:.2f}' for x in secs):>15}", flush=True)
        return tuple(gpus), tuple(placed)

    totals = {s: 0 for s in SPREADS}
    for n in sizes:
        for seed in range(seeds):
            kind, snap, demands = exact_instance(n, seed)
            if kind == "infeasible":
                continue
            gpus, placed = row(kind, n, seed, snap, demands, exact=n <= 8)
            if len(set(placed)) == 1:
                for s, g in zip(SPREADS, gpus):
                    totals[s] += g
    # Fleets of the operator's size: mixed products, 12 models, 2-8 replicas each (a
    # Model that asks several replicas for availability, not to fill the fleet).
    for seed in range(big_seeds):
        rng = random.Random(500 + seed)
        snap = fleet(rng, nodes)
        demands = workload(rng, snap, Policy(), list(MODELS), kinds=12, replicas=60)
        demands = [replace(d, replicas=rng.randint(2, 8)) for d in demands]
        gpus, placed = row("mixed", nodes, seed, snap, demands, exact=False)
        if len(set(placed)) == 1:
            for s, g in zip(SPREADS, gpus):
                totals[s] += g
    if totals["none"]:
        print(f"all instances that place as many each way: {totals['none']} GPUs packed, "
              f"{totals['gpu']} spread by GPU ({totals['gpu'] / totals['none']:.3f} x), "
              f"{totals['node']} by node ({totals['node'] / totals['none']:.3f} x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances, 20 s ILP limit")
    parser.add_argument("--ilp-limit", type=float, default=300.0,
                        help="seconds per ILP instance (default 300)")
    parser.add_argument("--only", choices=("exact", "itl", "baseline", "spread", "speed"),
                        help="run one part only")
    args = parser.parse_args()
    print(f"# kvpilot placement benchmark\nmachine: {hardware()}")
    parts = (args.only,) if args.only else ("exact", "itl", "baseline", "spread", "speed")
    if "exact" in parts:
        if args.quick:
            bench_exact([4, 8], seeds=4, limit=20)
        else:
            bench_exact([4, 8, 16, 32, 50], seeds=4, limit=args.ilp_limit)
    if "itl" in parts:
        bench_itl(50 if args.quick else 200, seeds=2 if args.quick else 4)
    if "baseline" in parts:
        bench_baseline(50 if args.quick else 200, seeds=2 if args.quick else 4)
    if "spread" in parts:
        if args.quick:
            bench_spread([4, 8], seeds=4, nodes=50, big_seeds=1, exact_limit=20)
        else:
            bench_spread([4, 8, 16, 32], seeds=4, nodes=200, big_seeds=3, exact_limit=60)
    if "speed" in parts:
        bench_speed(2000, 8, 5000, repeat=1 if args.quick else 5)
        bench_many_models(2000, 5000)


if __name__ == "__main__":
    main()
