"""Autoscaling at scale on the real control plane, with stand-in workers.

    python benchmarks/autoscaling.py                 # 50 Models autoscaling, 500 workers
    python benchmarks/autoscaling.py --models 10 --workers 50

Two measurements, one run:
1. Reaction: 50 Models autoscale at once; at T their workers' KV pressure jumps above the
   target. For each Model: seconds from T to its new pod's creation, minus the scale-up
   stabilization window, in scrape intervals (the target: at most 2).
2. Cost: the operator's CPU time per scrape round while it scrapes ``--workers`` workers
   (read from /proc over many rounds, fleet idle), next to the round's wall time.

The workers are small HTTP servers on each pod's loopback IP serving the worker's
metrics contract with figures the benchmark sets (``e2e/fake_workers.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "worker")]

from kvpilot.api.fleet import FleetNode  # noqa: E402
from kvpilot.operator.objects import LABEL_MODEL, SELECTOR  # noqa: E402

from e2e.cluster import Cluster, install_crds  # noqa: E402
from e2e.fake_workers import FakeWorkers  # noqa: E402
from e2e.fleet import create_nodes  # noqa: E402
from e2e.operator import OperatorProcess, wait_for  # noqa: E402
from machine import hardware  # noqa: E402  (beside this script)

SMALL = {"weights": {"bytes": "1Gi"},
         "architecture": {"layers": 24, "attentionHeads": 32, "kvHeads": 2, "headDim": 64,
                          "maxContextTokens": 32768},
         "sla": {"contextTokens": 4096, "concurrentSequences": 8}}


def model(name: str, replicas: int, window: int, autoscale: bool = True) -> dict:
    return {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {**SMALL, "replicas": replicas, "minReplicas": 1,
                     "maxReplicas": max(replicas, 2) * 2,
                     "autoscaling": {"enabled": autoscale, "targetKvPressurePercent": 75,
                                     "scaleUpStabilizationSeconds": window,
                                     "scaleDownStabilizationSeconds": 600,
                                     "cooldownSeconds": 0}}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def created(pod: dict) -> float:
    ts = pod["metadata"]["creationTimestamp"]
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--workers", type=int, default=500, help="for the scrape-cost part")
    ap.add_argument("--scrape", type=float, default=5.0, help="scrape interval, seconds")
    ap.add_argument("--window", type=int, default=15, help="scale-up window, seconds")
    args = ap.parse_args()
    print(f"machine: {hardware()}; scrape every "
          f"{args.scrape:.0f}s, scale-up window {args.window}s", flush=True)
    state = Path(tempfile.mkdtemp(prefix="kvpilot-autoscale-"))
    cluster = Cluster(state / "cluster", tie_to_parent=True)
    cluster.up()
    fakes = FakeWorkers(cluster)
    try:
        install_crds(cluster, ROOT / "crds")
        # Single-L4 nodes: 6 replicas of 3.4 GiB each, well under a node's 110 pods.
        nodes = [FleetNode(name=f"l4-{i:03d}", product="NVIDIA-L4", gpus=1,
                           gpu_memory_mib=23034) for i in range(args.workers // 5 + 10)]
        create_nodes(cluster, nodes, timeout=600, dra=True)
        fakes.start()
        op = OperatorProcess(cluster, state / "operator.log", mode="dra",
                             scrape_seconds=args.scrape, reconcile_seconds=30)
        op.start()
        try:
            # 1. reaction
            names = [f"r{i:03d}" for i in range(args.models)]
            for n in names:
                fakes.set(n, pressure=0.5)
            cluster.apply([model(n, 1, args.window) for n in names])
            wait_for(f"{args.models} workers", lambda: len(fakes.workers) >= args.models,
                     600, interval=2, log=op.log)
            time.sleep(3 * args.scrape)  # every window filled with calm samples
            t0 = time.time()
            for n in names:
                fakes.set(n, pressure=0.95)

            def second_pods():
                pods = cluster.get("pods", "-l", SELECTOR)["items"]
                by = {}
                for p in pods:
                    by.setdefault(p["metadata"]["labels"][LABEL_MODEL], []).append(p)
                return by if all(len(by.get(n, [])) >= 2 for n in names) else None

            by = wait_for("a second pod for every Model", second_pods, 600, interval=1,
                          log=op.log)
            late = []
            for n in names:
                newest = max(created(p) for p in by[n])
                late.append((newest - t0 - args.window) / args.scrape)
            for n in names:
                fakes.set(n, pressure=0.5)

            # 2. scrape cost with --workers workers (the rest as one more Model, static)
            extra = max(0, args.workers - 2 * args.models)
            if extra:
                fakes.set("bulk", pressure=0.5)
                bulk = model("bulk", extra, args.window, autoscale=False)
                bulk["spec"]["maxReplicas"] = extra
                cluster.apply([bulk])
            wait_for(f"{args.workers} workers", lambda: len(fakes.workers) >= args.workers,
                     900, interval=2, log=op.log)
            time.sleep(2 * args.scrape)
            rounds = 12
            c0, w0 = cpu_seconds(op.proc.pid), time.monotonic()
            time.sleep(rounds * args.scrape)
            cpu = (cpu_seconds(op.proc.pid) - c0) / rounds
            wall = time.monotonic() - w0
        finally:
            op.stop()
    finally:
        fakes.stop()
        cluster.down()
    print()
    print(f"{args.models} Models autoscaling at once, pressure 50% -> 95% (target 75%):")
    print(f"  new pod created after the {args.window}s window, in scrape intervals of "
          f"{args.scrape:.0f}s: median {statistics.median(late):.2f}, max {max(late):.2f} "
          f"(target <= 2; pod creation times have 1 s resolution)")
    print(f"operator CPU per scrape round with {args.workers} workers: {cpu * 1000:.0f} ms "
          f"({100 * cpu / args.scrape:.1f}% of one core at one round per {args.scrape:.0f}s; "
          f"{rounds} rounds in {wall:.0f}s, fleet idle)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
