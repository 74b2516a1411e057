"""kvpilot live, on a machine with no GPU and no cluster.

What runs, all of it real except the GPUs:

- a Kubernetes control plane on 127.0.0.1 (etcd, kube-apiserver, kube-scheduler,
  kube-controller-manager) and KWOK, which plays the kubelet for a mixed fleet of fake
  GPU nodes; their GPUs are published as DRA ResourceSlices with memory as consumable
  capacity, so the real kube-scheduler allocates GPU memory to each replica's claim;
- kvpilot's Helm chart (CRD, RBAC, the operator's Deployment), and the operator itself,
  run here with the token of the chart's ServiceAccount;
- the example Models (Llama-3-8B, Llama-3.1-70B, Mistral-7B, Qwen2.5-0.5B), placed by HBM;
  their pods are KWOK's (nothing serves them);
- one Model, ``tiny-chat``, served by real kvpilot workers on CPU (a tiny random Llama)
  whose ``source`` is ``hf://kvpilot/tiny-chat``: a stand-in for the Hugging Face hub
  (``e2e.hub``, on 127.0.0.1) serves the checkpoint, each worker pod's init container
  fetches it into the node's weights cache, and the worker checks it against the Model
  before it serves. A load ramp through ``kvpilot router`` (run here with the token of
  the chart's router ServiceAccount; it routes by the Model's Service's EndpointSlices)
  fills the KV caches, the operator scales the workers up on KV pressure, and when the
  load stops it drains a replica and scales back down.

``--plan-only`` keeps the older, offline demo: the same cluster and Models, and
``kvpilot plan`` on what the API server holds.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from kvpilot.api.quantity import format_bytes, parse_bytes
from kvpilot.operator.objects import ANN_TP, LABEL_MODEL, SELECTOR

from e2e.cluster import Cluster, default_state, install_crds, log, route_pod_cidr
from e2e.fleet import create_fleet

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleets" / "mixed.yaml"
GPU_COLUMNS = "-Lnvidia.com/gpu.product,nvidia.com/gpu.count,nvidia.com/gpu.memory"
LIVE_MODEL = "tiny-chat"


# -- the offline planner demo -----------------------------------------------------------

def fleet_from_cluster(cluster: Cluster) -> dict:
    """The cluster's GPU nodes as a fleet description (labels -> product, count, MiB)."""
    items = cluster.get("nodes")["items"]
    nodes = []
    for item in items:
        labels = item["metadata"].get("labels", {})
        if "nvidia.com/gpu.product" not in labels:
            continue
        nodes.append({
            "name": item["metadata"]["name"],
            "product": labels["nvidia.com/gpu.product"],
            "gpus": int(item["status"].get("allocatable", {}).get("nvidia.com/gpu", 0)),
            "memoryMiB": int(labels["nvidia.com/gpu.memory"]),
            "unschedulable": bool(item["spec"].get("unschedulable", False)),
        })
    return {"nodes": nodes}


def models_from_cluster(cluster: Cluster) -> list[dict]:
    items = cluster.get("models", "-A")["items"]
    return [{"apiVersion": m["apiVersion"], "kind": m["kind"],
             "metadata": {"name": m["metadata"]["name"],
                          "namespace": m["metadata"]["namespace"]},
             "spec": m["spec"]} for m in items]


def plan_only(cluster: Cluster, models: list[Path]) -> int:
    from kvpilot import cli

    install_crds(cluster, ROOT / "crds")
    nodes = create_fleet(cluster, FLEET)
    log(f"created {len(nodes)} fake GPU nodes from {FLEET}")
    for path in models:
        print(cluster.kubectl("apply", "-f", str(path)).stdout, end="")
    print()
    print(cluster.kubectl("get", "nodes", GPU_COLUMNS).stdout)
    print(cluster.kubectl("get", "models").stdout)
    workdir = cluster.state / "plan"
    workdir.mkdir(exist_ok=True)
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet_from_cluster(cluster)))
    (workdir / "models.yaml").write_text(yaml.safe_dump_all(models_from_cluster(cluster)))
    print("Placement plan for the Models and nodes in the cluster:\n")
    return cli.main(["plan", str(workdir / "fleet.yaml"), str(workdir / "models.yaml")])


# -- the live demo ----------------------------------------------------------------------

class Screen:
    """A refreshing view on a terminal; on a pipe, a snapshot now and then."""

    def __init__(self, every: float) -> None:
        self.tty = sys.stdout.isatty()
        self.every = every if self.tty else max(every, 15.0)
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def show(self, text: str) -> None:
        self.last = time.monotonic()
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            sys.stdout.write(text + "\n\n")
        sys.stdout.flush()


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def view(cluster: Cluster, load, workers, started: float, phase: str,
         router_url: str | None = None) -> str:
    models = cluster.get("models")["items"]
    pods = cluster.get("pods", "-l", SELECTOR)["items"]
    slices = cluster.get("resourceslices")["items"]
    claims = cluster.get("resourceclaims")["items"]
    lines = [f"kvpilot demo  {time.monotonic() - started:5.0f}s  load: {phase}",
             "Models (kubectl get models, plus where their replicas run):", ""]
    lines.append(f"{'MODEL':<15}{'READY':>7}{'TP':>4}{'HBM/GPU':>11}{'KV%':>5}  PLACEMENT / STATE")
    for m in models:
        st, name = m.get("status") or {}, m["metadata"]["name"]
        desired = m["spec"].get("replicas", 0)
        where = " ".join(f"{p['node']}:{','.join(map(str, p['gpus']))}"
                         + ("*" if p.get("shared") else "") for p in st.get("placements") or [])
        bad = [c for c in st.get("conditions") or [] if c["status"] == "True"
               and c["type"] in ("Unschedulable", "Degraded")]
        state = f"{bad[0]['type']}: {bad[0]['message']}" if bad else where
        kv = st.get("kvPressurePercent")
        head = (f"{name:<15}{st.get('readyReplicas', 0):>3}/{desired:<3}"
                f"{st.get('tensorParallel') or '-':>4}{st.get('hbmPerGpu') or '-':>11}"
                f"{'-' if kv is None else kv:>5}  ")
        # Reasons in full: wrapped under the column, never cut.
        body = textwrap.wrap(state, 100 - len(head), break_on_hyphens=False) or [""]
        lines.append(head + body[0])
        lines.extend(" " * len(head) + b for b in body[1:])
    lines += ["", "  * = GPU shared with other replicas (by HBM budget, enforced by the "
              "kube-scheduler's DRA allocation)", ""]
    live = next((m for m in models if m["metadata"]["name"] == LIVE_MODEL), None)
    if live is not None:
        from e2e.workers import endpoints

        url = (live.get("status") or {}).get("endpoint") or "(no Service yet)"
        logs = [f.read_text(errors="replace")
                for f in workers.logs.glob("*.fetch-weights.log")]
        downloaded = sum(1 for text in logs if ": done, commit" in text)
        cached = sum(1 for text in logs if "nothing to download" in text)
        lines += [f"{LIVE_MODEL}: {url} -> {len(endpoints(cluster, LIVE_MODEL))} ready "
                  "endpoints (its Service's EndpointSlices)",
                  f"  weights hf://kvpilot/{LIVE_MODEL}: {downloaded} pod(s) downloaded them "
                  f"from the hub, {cached} found them in the node's cache "
                  "(kubectl logs POD -c fetch-weights)", ""]
    lines.append("GPU memory allocated by the kube-scheduler:")
    capacity = {}
    for s in slices:
        for d in s["spec"]["devices"]:
            capacity[(s["spec"]["nodeName"], d["name"])] = d["capacity"]["memory"]["value"]
    used: dict = {}
    holders: dict = {}
    for c in claims:
        for r in ((c.get("status") or {}).get("allocation") or {}).get("devices", {}).get(
                "results", []):
            key = (r["pool"], r["device"])
            used[key] = used.get(key, 0) + parse_bytes(r["consumedCapacity"]["memory"])
            holders.setdefault(key, Counter())[c["metadata"]["labels"].get(
                LABEL_MODEL, "?")] += 1
    for key in sorted(used):
        cap = parse_bytes(capacity.get(key, "0"))
        who = ", ".join(f"{n} x{k}" if k > 1 else n for n, k in sorted(holders[key].items()))
        lines.append(f"  {key[0]:>7} {key[1]:<6} {format_bytes(used[key]):>9} of "
                     f"{format_bytes(cap):>9}  {_short(who, 60)}")
    running = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    whole = sum(int(p["metadata"]["annotations"].get(ANN_TP, 1))
                for p in running)
    lines.append(f"  {len(used)} GPUs hold {len(running)} replicas; as whole nvidia.com/gpu "
                 f"they would take {whole}")
    events = [e for e in cluster.get("events")["items"]
              if e["involvedObject"].get("kind") == "Model"]
    events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    lines += ["", "Recent decisions (kubectl get events):"]
    for e in events[-7:]:
        lines.append(f"  {e['involvedObject']['name']:<14} {e['reason']:<14} "
                     f"{_short(e['message'], 80)}")
    c = load.counts
    via = f" through the router {router_url}" if router_url else " (direct to the workers)"
    lines += ["", f"Load on {LIVE_MODEL}{via}: {load.clients} clients; requests complete "
              f"{c['complete']}, rejected 429 {c['rejected_429']}, 503 {c['rejected_503']}, "
              f"truncated {c['truncated']}, failed {c['failed']}; real workers running "
              f"{len(workers.processes)}", "Ctrl-C to stop."]
    return "\n".join(lines)


def live(cluster: Cluster, models: list[Path], duration: float, refresh: float) -> int:
    import threading

    from e2e.fleet import create_nodes
    from e2e.hub import Hub
    from e2e.load import Load, LoadThread
    from e2e.operator import chart_operator
    from e2e.workers import Workers, tiny_checkpoint, tiny_model
    from kvpilot.api.fleet import load_fleet

    nodes = load_fleet(FLEET).expand()
    log(f"creating {len(nodes)} fake GPU nodes from {FLEET.name}, GPUs published as DRA "
        "ResourceSlices")
    create_nodes(cluster, nodes, dra=True)
    tiny = tiny_checkpoint(cluster.state / "hub" / "kvpilot" / LIVE_MODEL)
    hub = Hub(cluster.state / "hub").start()
    log(f"a stand-in Hugging Face hub at {hub.url} serves hf://kvpilot/{LIVE_MODEL}")
    log("helm install kvpilot (CRD, RBAC, the operator and router Deployments)")
    op = chart_operator(cluster, cluster.state, "demo", hub_endpoint=hub.url,
                        weights_cache_dir=str(cluster.state / "weights"))
    log("starting the operator with the chart's ServiceAccount")
    op.start()
    workers = Workers(cluster, cluster.state / "workers", only=frozenset({LIVE_MODEL})).start()
    router = None
    if cluster.real_workers:
        # One OpenAI endpoint for the fleet, with the chart's router account.
        from e2e.chart import service_account_kubeconfig
        from e2e.router import RouterProcess

        router = RouterProcess(service_account_kubeconfig(
            cluster, cluster.state / "router-sa", "kvpilot-router"), cluster.state / "router.log")
        log(f"kvpilot router at {router.url} (its log: {router.log_path})")
        targets = once_serving(router)
    else:
        targets = lambda: [p.url for p in workers.ready(LIVE_MODEL)]  # noqa: E731
    load = Load(targets, LIVE_MODEL, prompt_tokens=300, max_tokens=48)
    driver = LoadThread(load)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    try:
        for path in models:
            cluster.kubectl("apply", "-f", str(path))
        cluster.apply([tiny_model(LIVE_MODEL, tiny, source=f"hf://kvpilot/{LIVE_MODEL}")])
        log(f"applied {len(models)} example Models and {LIVE_MODEL}; "
            f"showing it live for {duration:.0f}s")
        driver.start()
        screen = Screen(refresh)
        ramp_end, drop_at = 0.35 * duration, 0.6 * duration
        while not stop.is_set():
            t = time.monotonic() - started
            if t >= duration:
                break
            if t < ramp_end:
                load.clients, phase = 1 + int(7 * t / ramp_end), "ramping up"
            elif t < drop_at:
                load.clients, phase = 8, "holding"
            else:
                load.clients, phase = 0, "stopped (watch the scale-down drain)"
            if screen.due():
                try:
                    screen.show(view(cluster, load, workers, started, phase,
                                     router.url if router else None))
                except RuntimeError as err:  # the API server busy: next time
                    log(f"view: {err}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        driver.finish()
        summary = summarize(cluster, load)
        if router is not None:
            router.stop()
        workers.stop()
        op.stop()
        hub.stop()
    print(summary)
    return 0


def once_serving(router, every: float = 1.0):
    """The router's URL for the load, once it has a ready replica of the live Model
    (before, its answers would be 404s and 503s, not the demo's point); asked at most
    every ``every`` seconds."""
    import httpx

    seen = {"at": -every, "serving": False}

    def targets() -> list[str]:
        now = time.monotonic()
        if not seen["serving"] and now - seen["at"] >= every:
            seen["at"] = now
            try:
                seen["serving"] = router.replicas(LIVE_MODEL) > 0
            except (httpx.HTTPError, ValueError):
                pass
        return [router.url] if seen["serving"] else []

    return targets


def summarize(cluster: Cluster, load) -> str:
    events = [e for e in cluster.get("events")["items"]
              if e["involvedObject"].get("kind") == "Model"]
    reasons = Counter(e["reason"] for e in events)
    c = load.counts
    placed = {m["metadata"]["name"]: (m.get("status") or {}).get("replicas", 0)
              for m in cluster.get("models")["items"]}
    return "\n".join([
        "Summary",
        f"  replicas now: {', '.join(f'{k} {v}' for k, v in sorted(placed.items()))}",
        f"  operator decisions: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}",
        f"  requests to {LIVE_MODEL}: complete {c['complete']}, rejected 429 "
        f"{c['rejected_429']}, 503 {c['rejected_503']}, truncated {c['truncated']}, failed "
        f"{c['failed']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", type=Path,
                        default=sorted((ROOT / "examples").glob("*.yaml")))
    parser.add_argument("--duration", type=float, default=240,
                        help="seconds to run the live demo (default 240; Ctrl-C stops it)")
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between redraws")
    parser.add_argument("--plan-only", action="store_true",
                        help="no operator: apply the Models and print kvpilot plan")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    # Routable pod IPs let the Service's EndpointSlices hold the workers (the load goes
    # through the router, which reads them); without the right to add the route, the load
    # finds the workers itself.
    unroutable = route_pod_cidr()
    if unroutable:
        log(f"pod IPs stay on loopback ({unroutable}): the load goes to the workers directly, "
            "not through the router")
    cluster = Cluster(default_state("demo"), real_workers=not unroutable)
    if cluster.running():
        log("a demo cluster is still running; stopping it first")
        cluster.down()
    try:
        log("starting the local control plane (the first run builds it: see "
            "docs/local-cluster.md)")
        cluster.up()
        try:
            if args.plan_only:
                return plan_only(cluster, args.models)
            return live(cluster, args.models, args.duration, args.refresh)
        finally:
            if args.keep:
                log(f"cluster left running; export KUBECONFIG={cluster.kubeconfig}; "
                    "stop it with: python -m e2e.cluster --name demo down")
            else:
                cluster.down()
                log("cluster stopped")
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError) as err:
        log(f"error: {err}")
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
