"""What the cluster holds, read as the tests check it: replicas (a pod and its claim),
allocations, a Model's status, conditions and Events, a Model's live pods."""

from __future__ import annotations

from collections import Counter, defaultdict

from kvpilot.api.quantity import parse_bytes

from e2e.cluster import Cluster
from e2e.fleet import SELECTOR


def objects(cluster: Cluster, kind: str) -> list[dict]:
    return cluster.get(kind, "-A", "-l", SELECTOR)["items"]


def replicas(cluster: Cluster) -> dict[str, dict]:
    """Replica name -> its pod and claim (either may be missing)."""
    out: dict[str, dict] = defaultdict(dict)
    for kind, key in (("pods", "pod"), ("resourceclaims", "claim")):
        for o in objects(cluster, kind):
            if not o["metadata"].get("deletionTimestamp"):
                out[o["metadata"]["name"]][key] = o
    return dict(out)


def running(cluster: Cluster, counts: dict[str, int], others: bool = False) -> dict | None:
    """The replicas once exactly ``counts`` per model run with allocated claims (with
    ``others``: of those models; other models may have any)."""
    reps = replicas(cluster)
    if others:
        reps = {n: r for n, r in reps.items()
                if (r.get("pod") or r.get("claim"))["metadata"]["labels"]["kvpilot.dev/model"]
                in counts}
    per_model = Counter(r["pod"]["metadata"]["labels"]["kvpilot.dev/model"]
                        for r in reps.values() if "pod" in r)
    if dict(per_model) != counts:
        return None
    for r in reps.values():
        if "pod" not in r or "claim" not in r:
            return None
        if r["pod"]["status"].get("phase") != "Running":
            return None
        if not (r["claim"].get("status") or {}).get("allocation"):
            return None
    return reps


def allocated(claim: dict) -> list[tuple[str, str, int]]:
    """(pool, device, consumed bytes) the kube-scheduler allocated to a claim."""
    return [(r["pool"], r["device"], parse_bytes(r["consumedCapacity"]["memory"]))
            for r in claim["status"]["allocation"]["devices"]["results"]]


def check_consistent(cluster: Cluster, reps: dict) -> dict[tuple[str, str], list[str]]:
    """Every pod runs where it was planned, every claim holds the planned GPUs with the
    planned memory, and no GPU's claims exceed its capacity. Returns GPU -> replicas."""
    capacity = {}
    for s in cluster.get("resourceslices")["items"]:
        for d in s["spec"]["devices"]:
            capacity[(s["spec"]["pool"]["name"], d["name"])] = parse_bytes(
                d["capacity"]["memory"]["value"])
    used: dict[tuple[str, str], int] = defaultdict(int)
    holders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for c in cluster.get("resourceclaims", "-A")["items"]:
        for pool, dev, consumed in allocated(c) if (c.get("status") or {}).get("allocation") \
                else []:
            used[(pool, dev)] += consumed
    for name, r in reps.items():
        ann = r["pod"]["metadata"]["annotations"]
        assert r["pod"]["spec"]["nodeName"] == ann["kvpilot.dev/node"], name
        planned = sorted(f"gpu-{g}" for g in ann["kvpilot.dev/gpus"].split(","))
        got = allocated(r["claim"])
        assert sorted(d for _, d, _ in got) == planned, name
        assert {p for p, _, _ in got} == {ann["kvpilot.dev/node"]}, name
        assert {c for _, _, c in got} == {int(ann["kvpilot.dev/hbm-per-gpu"])}, name
        for pool, dev, _ in got:
            holders[(pool, dev)].append(r["pod"]["metadata"]["labels"]["kvpilot.dev/model"])
    for gpu, total in used.items():
        assert total <= capacity[gpu], f"{gpu} holds {total} > {capacity[gpu]}"
    return holders


def model_status(cluster: Cluster, name: str) -> dict:
    return cluster.get("model", name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def events(cluster: Cluster, name: str) -> list[dict]:
    return [e for e in cluster.get("events", "-n", "default")["items"]
            if e["involvedObject"].get("kind") == "Model"
            and e["involvedObject"].get("name") == name]


def pods(cluster: Cluster, name: str) -> dict[str, dict]:
    """A Model's pods by name."""
    items = cluster.get("pods", "-l", f"kvpilot.dev/model={name}")["items"]
    return {p["metadata"]["name"]: p for p in items}


def live(cluster: Cluster, name: str) -> list[str]:
    """A Model's pods not being deleted."""
    return sorted(n for n, p in pods(cluster, name).items()
                  if not p["metadata"].get("deletionTimestamp"))
