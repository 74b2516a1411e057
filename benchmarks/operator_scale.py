"""The operator at fleet scale on the real control plane (KWOK nodes, DRA claims).

    python benchmarks/operator_scale.py                      # 1,000 nodes, 200 Models, 2,000 replicas
    python benchmarks/operator_scale.py --nodes 100 --models 20 --replicas 10

Measures, in one run:
- time from `kubectl apply` of every Model to every worker pod Running (claims allocated
  by the kube-scheduler);
- the operator's peak RSS;
- API writes per idle fleet pass (from the API server's audit log);
- GPUs with load under kvpilot (claims sharing GPUs by HBM) against the same replicas
  requested as whole `nvidia.com/gpu` and scheduled by the kube-scheduler alone, each
  restricted to the products that can hold it (the baseline).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "worker")]

from kvpilot.api.fleet import FleetNode  # noqa: E402
from kvpilot.api.gpus import CATALOG  # noqa: E402
from kvpilot.api.memory import replica_budget  # noqa: E402
from kvpilot.api.model import ModelSpec  # noqa: E402
from kvpilot.operator.objects import SELECTOR  # noqa: E402

from e2e.cluster import Cluster, install_crds  # noqa: E402
from e2e.fleet import create_nodes  # noqa: E402
from e2e.operator import OperatorProcess, operator_writes, wait_for  # noqa: E402
from machine import hardware  # noqa: E402  (beside this script)

PRODUCTS = [("NVIDIA-H100-80GB-HBM3", 8, 0.35), ("NVIDIA-H200", 8, 0.15),
            ("NVIDIA-A100-SXM4-80GB", 8, 0.2), ("NVIDIA-L40S", 4, 0.15),
            ("NVIDIA-L4", 1, 0.15)]
# (weights, layers, kv heads, head dim, context, sequences): 3-60 GiB per replica.
SHAPES = [("1Gi", 24, 2, 64, 4096, 8), ("3Gi", 28, 4, 128, 8192, 4),
          ("15Gi", 32, 8, 128, 8192, 4), ("15Gi", 32, 8, 128, 16384, 8),
          ("28Gi", 40, 8, 128, 8192, 8), ("40Gi", 48, 8, 128, 8192, 8)]


def fleet(n: int, rng: random.Random) -> list[FleetNode]:
    nodes = []
    weights = [w for _, _, w in PRODUCTS]
    for i in range(n):
        product, gpus, _ = rng.choices(PRODUCTS, weights)[0]
        nodes.append(FleetNode(name=f"n{i:05d}", product=product, gpus=gpus,
                               gpu_memory_mib=CATALOG[product].memory_mib))
    return nodes


def models(n: int, replicas: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        w, layers, kv, hd, ctx, seqs = rng.choice(SHAPES)
        out.append({
            "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": f"m{i:04d}", "namespace": "default"},
            "spec": {"weights": {"bytes": w},
                     "architecture": {"layers": layers, "attentionHeads": 32, "kvHeads": kv,
                                      "headDim": hd, "maxContextTokens": 131072},
                     "sla": {"contextTokens": ctx, "concurrentSequences": seqs},
                     "replicas": replicas, "maxReplicas": max(replicas, 1) * 2},
        })
    return out


def fits_on(model: dict) -> list[str]:
    spec = ModelSpec.model_validate(model["spec"])
    need = replica_budget(spec, 1).per_gpu
    return [p for p, _, _ in PRODUCTS if CATALOG[p].hbm_bytes >= need]


def phases(cluster: Cluster, selector: str) -> Counter:
    """Pods by phase; empty when the API server could not answer this time."""
    try:
        out = cluster.kubectl("get", "pods", "-A", "-l", selector, "-o",
                              "jsonpath={range .items[*]}{.status.phase}{'\\n'}{end}",
                              timeout=120).stdout
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"  (pods not listed this time: {str(err)[:80]})", flush=True)
        return Counter()
    return Counter(line for line in out.splitlines() if line)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gpus_with_claims(cluster: Cluster) -> int:
    claims = cluster.get("resourceclaims", "-A")["items"]
    return len({(r["pool"], r["device"]) for c in claims
                for r in ((c.get("status") or {}).get("allocation") or {}).get(
                    "devices", {}).get("results", [])})


def baseline(cluster: Cluster, objs: list[dict], replicas: int) -> tuple[int, int]:
    """Whole-GPU pods, one per replica, on products that hold it: (bound, pending); each
    bound pod holds one GPU."""
    cluster.kubectl("create", "namespace", "baseline", check=False)
    pods = []
    for m in objs:
        products = fits_on(m)
        for r in range(replicas):
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{m['metadata']['name']}-{r}", "namespace": "baseline",
                             "labels": {"bench": "count"}},
                "spec": {"containers": [{"name": "w", "image": "kvpilot/worker:0.1.0",
                                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                         "affinity": {"nodeAffinity": {
                             "requiredDuringSchedulingIgnoredDuringExecution": {
                                 "nodeSelectorTerms": [{"matchExpressions": [{
                                     "key": "nvidia.com/gpu.product", "operator": "In",
                                     "values": products}]}]}}}},
            })
    for i in range(0, len(pods), 500):
        cluster.kubectl("create", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": pods[i:i + 500]}), timeout=300)
    time.sleep(5)
    last = None
    while True:  # until the scheduler stops binding
        p = phases(cluster, "bench=count")
        if p == last:
            break
        last = p
        time.sleep(5)
    bound = last.get("Running", 0)
    return bound, len(pods) - bound


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=10, help="per Model")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    state = Path(tempfile.mkdtemp(prefix="kvpilot-scale-"))
    # KWOK heartbeats a thousand fake nodes late on a small machine: without these two
    # graces the node controller marks busy nodes Unknown and the operator (rightly)
    # moves their replicas, which would measure the machine, not the rollout.
    cluster = Cluster(state / "cluster", tie_to_parent=True, node_monitor_grace="10m")
    print(f"machine: {hardware()}", flush=True)
    cluster.up()
    try:
        install_crds(cluster, ROOT / "crds")
        t = time.monotonic()
        create_nodes(cluster, fleet(args.nodes, rng), timeout=600, dra=True)
        print(f"{args.nodes} KWOK GPU nodes with ResourceSlices in "
              f"{time.monotonic() - t:.0f}s", flush=True)
        objs = models(args.models, args.replicas, rng)
        total = args.models * args.replicas
        op = OperatorProcess(cluster, state / "operator.log", mode="dra",
                             reconcile_seconds=10, scrape_seconds=60,
                             not_ready_grace_seconds=600)
        op.start()
        try:
            time.sleep(3)
            started = time.monotonic()
            for i in range(0, len(objs), 50):
                cluster.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-",
                                input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": objs[i:i + 50]}), timeout=600)

            created: list[float] = []

            def progress():
                p = phases(cluster, SELECTOR)
                print(f"  {time.monotonic() - started:5.0f}s  {dict(p)}", flush=True)
                if not created and sum(p.values()) >= total:
                    created.append(time.monotonic() - started)
                return p.get("Running", 0) >= total

            wait_for(f"{total} pods Running", progress, 3600, interval=5, log=op.log)
            rollout = time.monotonic() - started
            time.sleep(15)  # let status catch up
            before = len(operator_writes(cluster))
            idle = 30.0
            time.sleep(idle)
            writes = len(operator_writes(cluster)) - before
            rss = peak_rss_mib(op.proc.pid)
            kv_gpus = gpus_with_claims(cluster)
        finally:
            op.stop()
        bound, pending = baseline(cluster, objs, args.replicas)
        count_gpus = bound  # one whole GPU per bound pod
    finally:
        cluster.down()
    passes = idle / 10
    print()
    print(f"fleet: {args.nodes} nodes, {args.models} Models, {total} replicas")
    first = next((line.split(": ", 1)[1] for line in op.log().splitlines()
                  if "kvpilot.fleet: pass 1 " in line), "?")
    print(f"operator's first pass (plan every replica, write claims and pods): {first}")
    print(f"apply -> all {total} pods created: {created[0] if created else float('nan'):.0f}s; "
          f"-> all Running (claims allocated, pods bound by the kube-scheduler): {rollout:.0f}s")
    print(f"operator peak RSS: {rss:.0f} MiB")
    print(f"API writes per idle pass: {writes / passes:.1f} ({writes} in {idle:.0f}s, "
          f"~{passes:.0f} passes)")
    print(f"GPUs with load: kvpilot {kv_gpus}; whole GPUs by kube-scheduler alone "
          f"{count_gpus} for {bound} of {total} replicas ({pending} left Pending); "
          f"ratio {kv_gpus / max(1, count_gpus):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
