"""Models created and deleted in a loop for minutes: the operator's memory and pass time
must stay flat, and nothing may be left behind (issue #29).

    python benchmarks/operator_soak.py                          # 10 minutes, 1,000 Models a round
    python benchmarks/operator_soak.py --seconds 180 --models 1000 --batch 100

A local control plane (``e2e.cluster``: real kube-apiserver, etcd, scheduler and
controller-manager, KWOK nodes with their GPUs as DRA ResourceSlices) and the operator
as a process (``kvpilot operator``), as the end-to-end tests run them. A round creates
``--models`` small Models (one replica each), ``--batch`` at a time: a batch is applied,
each of its Models' pod and claim are made, then the batch is deleted and every object
of it goes. Rounds repeat for ``--seconds``.

Printed after each batch: Models created so far, the operator's resident memory, its
fleet passes and their mean duration during the batch (from its own
``kvpilot_operator_reconcile_duration_seconds``), and at the end pods, claims and Models
of the soak left behind (must be 0), with the hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "operator", ROOT / "worker", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks.machine import hardware  # noqa: E402
from kvpilot.api.fleet import FleetNode  # noqa: E402

LABEL = "kvpilot.dev/soak"
H100 = "NVIDIA-H100-80GB-HBM3"


def soak_model(name: str) -> dict:
    """A small Model: 1 GiB of weights, 384 MiB of KV, one replica."""
    return {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": "default", "labels": {LABEL: "1"}},
            "spec": {"weights": {"bytes": "1Gi"},
                     "architecture": {"layers": 24, "attentionHeads": 32, "kvHeads": 2,
                                      "headDim": 64, "maxContextTokens": 131072},
                     "sla": {"contextTokens": 4096, "concurrentSequences": 8},
                     "replicas": 1}}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pass_totals(metrics_port: int) -> tuple[float, float]:
    """(seconds, passes) the operator's fleet passes took so far."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("kvpilot_operator_reconcile_duration_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("kvpilot_operator_reconcile_duration_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def _count(cluster, kind: str, *args: str) -> int:
    out = cluster.kubectl("get", kind, *args, "-o", "name", timeout=120).stdout
    return len(out.split())


def _soak_objects(cluster, model_names: set[str] | None = None) -> dict[str, int]:
    """Pods, claims and Models of the soak that still exist."""
    counts = {}
    for kind in ("pods", "resourceclaims"):
        items = cluster.get(kind, "-l", "app.kubernetes.io/managed-by=kvpilot")["items"]
        counts[kind] = sum(1 for o in items
                           if o["metadata"]["labels"].get("kvpilot.dev/model", "")
                           .startswith("soak-"))
    counts["models"] = _count(cluster, "models", "-l", LABEL)
    return counts


def _wait(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        time.sleep(0.5)


@dataclass
class Round:
    """One batch created and deleted."""

    at: float  # seconds since the soak started
    created: int  # Models created so far
    rss_mib: float
    passes: int  # during the batch
    pass_mean: float  # seconds


def run_soak(cluster, op, metrics_port: int, *, seconds: float, models: int, batch: int,
             out=None) -> tuple[list[Round], dict[str, int]]:
    """Rounds of ``models`` Models, ``batch`` at a time, for ``seconds`` (at least one
    round); a record per batch and what is left behind."""
    rounds: list[Round] = []
    start = time.monotonic()
    created = 0
    seen_total, seen_count = pass_totals(metrics_port)
    while not rounds or time.monotonic() - start < seconds:
        for first in range(0, models, batch):
            names = [f"soak-{i}" for i in range(first, min(models, first + batch))]
            cluster.apply([soak_model(n) for n in names])
            created += len(names)
            _wait("the batch's pods and claims", lambda: (
                c := _soak_objects(cluster))["pods"] >= len(names)
                and c["resourceclaims"] >= len(names), 300)
            cluster.kubectl("delete", "models", "-l", LABEL, "--wait=false", timeout=120)
            _wait("the batch gone", lambda: not any(_soak_objects(cluster).values()), 300)
            total, count = pass_totals(metrics_port)
            passes = int(count - seen_count)
            r = Round(time.monotonic() - start, created, rss_mib(op.proc.pid), passes,
                      (total - seen_total) / passes if passes else 0.0)
            seen_total, seen_count = total, count
            rounds.append(r)
            if out is not None:
                print(f"{r.at:7.0f}s  Models created {r.created:6d}  operator RSS "
                      f"{r.rss_mib:7.1f} MiB  passes {r.passes:4d}, mean "
                      f"{1000 * r.pass_mean:6.1f} ms", file=out, flush=True)
    return rounds, _soak_objects(cluster)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--models", type=int, default=1000, help="Models created per round")
    p.add_argument("--batch", type=int, default=100, help="Models applied at once")
    p.add_argument("--nodes", type=int, default=8, help="fake nodes of 8 H100s")
    args = p.parse_args(argv)
    from e2e.cluster import free_port
    from e2e.fleet import fleet_cluster
    from e2e.operator import OperatorProcess

    nodes = [FleetNode(name=f"h100-{i}", product=H100, gpus=8, gpu_memory_mib=81559)
             for i in range(args.nodes)]
    with tempfile.TemporaryDirectory() as tmp:
        with fleet_cluster(Path(tmp) / "cluster", nodes, dra=True, crds=ROOT / "crds") as c:
            port = free_port()
            op = OperatorProcess(c, Path(tmp) / "operator.log", metrics_port=port,
                                 reconcile_seconds=5)
            op.start()
            try:
                _wait("the operator's metrics", lambda: _up(port), 60)
                print(f"{args.nodes} nodes x 8 H100; rounds of {args.models} Models, "
                      f"{args.batch} at a time, for {args.seconds:.0f} s; {hardware()}",
                      flush=True)
                rounds, left = run_soak(c, op, port, seconds=args.seconds, models=args.models,
                                        batch=args.batch, out=sys.stdout)
                alive = op.proc.poll() is None
            finally:
                op.stop()
    print(f"left behind: {json.dumps(left)}; operator {'running' if alive else 'EXITED'}; "
          f"RSS {rounds[0].rss_mib:.1f} -> {rounds[-1].rss_mib:.1f} MiB; mean pass "
          f"{1000 * rounds[0].pass_mean:.1f} -> {1000 * rounds[-1].pass_mean:.1f} ms")
    return 0 if alive and not any(left.values()) else 1


def _up(port: int) -> bool:
    try:
        pass_totals(port)
        return True
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
