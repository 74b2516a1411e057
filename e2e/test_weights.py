"""From a Model to a served endpoint on the local cluster: weights fetched from hf:// (a
stand-in hub speaking the hub's file API, ``e2e.hub``), checked against the Model, served
through the Model's Service; and what a user sees when the weights are wrong or cannot
be had.

Real workers (``e2e.workers``: init container, worker and readiness done as a kubelet
would) on KWOK pods; the EndpointSlices are the real kube-controller-manager's, the
pods' binding the real kube-scheduler's.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kvpilot.api.model import ModelSpec
from kvpilot.operator.objects import Replica, pod_for

from e2e.fleet import FleetNode, fleet_cluster
from e2e.hub import Hub
from e2e.load import Load, LoadThread
from e2e.operator import OperatorProcess, wait_for
from e2e.workers import Workers, endpoints, tiny_checkpoint, tiny_model

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA-H100-80GB-HBM3"
FLEET = [FleetNode(name=f"h100-{i}", product=H100, gpus=2, gpu_memory_mib=81559)
         for i in range(2)]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("weights-cluster"), FLEET, dra=True,
                       crds=ROOT / "crds", real_workers=True) as c:
        yield c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def hub(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("hub")
    for repo in ("org/tiny", "org/gated"):
        shutil.copytree(checkpoint, root / repo)
    with Hub(root) as h:
        yield h


@pytest.fixture(scope="module")
def fleet(cluster, hub, tmp_path_factory):
    """The operator (its weights cache a directory here, the stand-in hub its hub) and a
    kubelet's part for every worker pod."""
    state = tmp_path_factory.mktemp("weights-run")
    op = OperatorProcess(cluster, state / "operator.log", scrape_seconds="1",
                         drain_timeout_seconds="60", weights_cache_dir=str(state / "cache"),
                         hub_endpoint=hub.url).start()
    workers = Workers(cluster, state / "workers").start()
    try:
        yield op, workers, state / "cache"
    finally:
        workers.stop()
        op.stop()


def status(cluster, name: str) -> dict:
    return cluster.get("model", name).get("status") or {}


def condition(cluster, name: str, type_: str) -> dict:
    return next((c for c in status(cluster, name).get("conditions") or []
                 if c["type"] == type_), {})


def warnings(cluster, name: str) -> list[tuple[str, str]]:
    return [(e["reason"], e["message"]) for e in cluster.get("events", "-n", "default")["items"]
            if e["involvedObject"].get("name") == name and e["type"] == "Warning"]


def serving_pods(cluster, model: str) -> list[str]:
    """URLs of the Model's pods that are Ready and not draining (what its Service should
    send requests to)."""
    pods = cluster.get("pods", "-l", f"kvpilot.dev/model={model}")["items"]
    return sorted(
        f"http://{p['status']['podIP']}:8000" for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and "kvpilot.dev/drain-started" not in (p["metadata"].get("annotations") or {})
        and any(c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions") or []))


def complete(url: str, model: str, max_tokens: int = 8) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "kv cache",
                                                  "max_tokens": max_tokens}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_hf_model_is_fetched_once_verified_and_served_through_its_service(
        cluster, hub, fleet, checkpoint):
    op, workers, cache = fleet
    logs = lambda: op.log()[-3000:] + "\n" + workers.tails(1500)  # noqa: E731
    model = tiny_model("tiny", checkpoint, source="hf://org/tiny")
    model["spec"]["autoscaling"] = {"enabled": False}
    cluster.apply([model])

    wait_for("a ready endpoint", lambda: len(endpoints(cluster, "tiny")) == 1, 180, log=logs)
    (url,) = endpoints(cluster, "tiny")
    assert complete(url, "tiny")["choices"][0]["text"]
    fetched = cache / "hf" / "org" / "tiny" / "main"
    assert {p.name for p in checkpoint.iterdir()} <= {p.name for p in fetched.iterdir()}
    assert status(cluster, "tiny")["endpoint"] == "http://tiny.default.svc/v1"
    service = cluster.get("service", "tiny")
    assert service["metadata"]["ownerReferences"][0]["kind"] == "Model"
    assert service["spec"]["ports"][0]["port"] == 80

    # A second replica (the real scheduler binds it) reads the same cache: no download.
    cluster.kubectl("scale", "model/tiny", "--replicas=2")
    wait_for("two endpoints", lambda: len(endpoints(cluster, "tiny")) == 2, 180, log=logs)
    assert endpoints(cluster, "tiny") == serving_pods(cluster, "tiny")
    downloads = Counter(r.path.rsplit("/", 1)[-1] for r in hub.requests
                        if r.method == "GET" and r.path.startswith("/org/tiny/resolve/"))
    files = {p.name for p in fetched.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert downloads == {f: 1 for f in files}, downloads  # once, for both replicas

    # A scale-down drains one replica: it leaves the endpoints while it drains.
    before = set(endpoints(cluster, "tiny"))
    streams = [httpx.stream("POST", f"{u}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "drain", "max_tokens": 480, "stream": True})
        for u in sorted(before) for _ in range(3)]
    responses = [s.__enter__() for s in streams]
    cluster.kubectl("scale", "model/tiny", "--replicas=1")
    seen_draining = []

    def drained_out() -> bool:
        pods = cluster.get("pods", "-l", "kvpilot.dev/model=tiny")["items"]
        draining = [f"http://{p['status']['podIP']}:8000" for p in pods
                    if "kvpilot.dev/drain-started" in p["metadata"].get("annotations", {})]
        now = set(endpoints(cluster, "tiny"))
        if draining and not now & set(draining) and now == set(serving_pods(cluster, "tiny")):
            seen_draining.extend(draining)
            return True
        return False

    wait_for("a draining replica out of the endpoints", drained_out, 60, interval=0.1,
             log=logs)
    bodies = [b"".join(r.iter_bytes()) for r in responses]
    for s in streams:
        s.__exit__(None, None, None)
    assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)  # drained, not cut
    wait_for("one replica left", lambda: len(cluster.get(
        "pods", "-l", "kvpilot.dev/model=tiny")["items"]) == 1, 90, log=logs)
    assert endpoints(cluster, "tiny") == serving_pods(cluster, "tiny")
    assert seen_draining[0] not in endpoints(cluster, "tiny")
    cluster.kubectl("delete", "model", "tiny", "--wait=true", timeout=120)


def test_a_model_whose_facts_disagree_with_its_checkpoint_says_which_and_heals(
        cluster, fleet, checkpoint):
    op, workers, _ = fleet
    logs = lambda: op.log()[-3000:] + "\n" + workers.tails(1500)  # noqa: E731
    model = tiny_model("liar", checkpoint)
    truth = json.loads(json.dumps(model["spec"]))
    model["spec"]["architecture"]["layers"] += 1
    model["spec"]["weights"]["bytes"] *= 2
    model["spec"]["autoscaling"] = {"enabled": False}
    cluster.apply([model])
    wait_for("WeightsMismatch", lambda: condition(cluster, "liar", "Degraded").get("reason")
             == "WeightsMismatch", 120, log=logs)
    message = condition(cluster, "liar", "Degraded")["message"]
    layers = truth["architecture"]["layers"]
    assert f"architecture.layers: the Model says {layers + 1}, config.json says {layers}" \
        in message, message
    assert str(truth["weights"]["bytes"] * 2) in message and \
        str(truth["weights"]["bytes"]) in message, message
    assert condition(cluster, "liar", "Ready")["status"] == "False"
    assert any(r == "WeightsMismatch" for r, _ in warnings(cluster, "liar"))

    # The user fixes the Model: the failing replica is replaced at once and serves.
    cluster.kubectl("patch", "model", "liar", "--type=merge", "-p", json.dumps(
        {"spec": {"architecture": truth["architecture"], "weights": truth["weights"]}}))
    wait_for("the fixed Model ready", lambda: condition(cluster, "liar", "Ready").get(
        "status") == "True", 180, log=logs)
    assert condition(cluster, "liar", "Degraded")["status"] == "False"
    (url,) = endpoints(cluster, "liar")
    assert complete(url, "liar")["choices"][0]["text"]
    cluster.kubectl("delete", "model", "liar", "--wait=true", timeout=120)


def test_weights_that_cannot_be_had_say_why_until_the_user_fixes_it(cluster, hub, fleet,
                                                                    checkpoint):
    op, workers, _ = fleet
    logs = lambda: op.log()[-3000:] + "\n" + workers.tails(1500)  # noqa: E731
    hub.protect("org/gated", "hf_secret_token")
    missing = tiny_model("missing", checkpoint, source="hf://org/no-such-model")
    gated = tiny_model("gated", checkpoint, source="hf://org/gated")
    no_claim = tiny_model("no-claim", checkpoint, source="pvc://no-such-claim/tiny")
    for m in (missing, gated, no_claim):
        m["spec"]["autoscaling"] = {"enabled": False}
    cluster.apply([missing, gated, no_claim])

    def unavailable(name: str) -> bool:
        return condition(cluster, name, "Degraded").get("reason") == "WeightsUnavailable"

    for name in ("missing", "gated", "no-claim"):
        wait_for(f"{name}: WeightsUnavailable", lambda: unavailable(name), 120, log=logs)
    assert "org/no-such-model" in condition(cluster, "missing", "Degraded")["message"]
    assert "sourceSecret" in condition(cluster, "gated", "Degraded")["message"]
    assert 'persistentvolumeclaim "no-such-claim" not found' in condition(
        cluster, "no-claim", "Degraded")["message"]
    for name in ("missing", "gated", "no-claim"):
        assert any(r == "WeightsUnavailable" for r, _ in warnings(cluster, name)), name

    # The token arrives: the gated Model fetches and serves.
    cluster.apply([{"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "hub-token", "namespace": "default"},
                    "stringData": {"HF_TOKEN": "hf_secret_token"}}])
    cluster.kubectl("patch", "model", "gated", "--type=merge", "-p",
                    '{"spec": {"sourceSecret": "hub-token"}}')
    wait_for("the gated Model ready", lambda: condition(cluster, "gated", "Ready").get(
        "status") == "True", 180, log=logs)
    (url,) = endpoints(cluster, "gated")
    assert complete(url, "gated")["choices"][0]["text"]
    cluster.kubectl("delete", "model", "missing", "gated", "no-claim", "--wait=true",
                    timeout=120)


def test_cordoning_a_node_under_load_moves_its_replica_and_loses_no_request(
        cluster, fleet, checkpoint):
    op, workers, _ = fleet
    logs = lambda: op.log()[-3000:] + "\n" + workers.tails(1500)  # noqa: E731
    model = tiny_model("steady", checkpoint)
    model["spec"]["autoscaling"] = {"enabled": False}
    cluster.apply([model])
    wait_for("a ready endpoint", lambda: len(endpoints(cluster, "steady")) == 1, 180, log=logs)
    (pod,) = cluster.get("pods", "-l", "kvpilot.dev/model=steady")["items"]
    node = pod["spec"]["nodeName"]
    load = Load(lambda: endpoints(cluster, "steady"), "steady", prompt_tokens=200,
                max_tokens=32)
    driver = LoadThread(load)
    driver.start()
    try:
        load.clients = 3
        wait_for("requests served", lambda: load.counts["complete"] >= 5, 60, log=logs)
        cluster.kubectl("cordon", node)
        wait_for("the replica moved off the cordoned node", lambda: [
            p["spec"]["nodeName"] for p in cluster.get(
                "pods", "-l", "kvpilot.dev/model=steady")["items"]] == [
            n for n in ("h100-0", "h100-1") if n != node], 240, log=logs)
        served = load.counts["complete"]
        wait_for("requests served by the new replica",
                 lambda: load.counts["complete"] >= served + 5, 60, log=logs)
    finally:
        driver.finish()
        cluster.kubectl("uncordon", node)
    counts = dict(load.counts)
    assert counts.get("failed", 0) == 0 and counts.get("truncated", 0) == 0, (
        counts, load.errors[:5])
    reasons = [e["reason"] for e in cluster.get("events", "-n", "default")["items"]
               if e["involvedObject"].get("name") == "steady"]
    assert "Draining" in reasons and "ReplicaLost" not in reasons, reasons
    cluster.kubectl("delete", "model", "steady", "--wait=true", timeout=120)


def test_the_api_server_takes_the_pod_of_every_source_scheme(cluster):
    """The pods the operator builds, one per scheme, as the real API server validates and
    stores them (a dry run: nothing is created): every volume kept as built."""
    spec_json = {"weights": {"bytes": "1Gi"},
                 "sla": {"contextTokens": 512, "concurrentSequences": 1},
                 "architecture": {"layers": 2, "attentionHeads": 4, "kvHeads": 2,
                                  "headDim": 16, "maxContextTokens": 512}}
    for i, source in enumerate(("hf://org/tiny@v1", "pvc://models/tiny",
                                "oci://registry.example.com/models/tiny:v1",
                                "host:///var/lib/models/tiny", "file:///weights/tiny")):
        extra = {"sourceSecret": "hub"} if source.startswith("hf://") else {}
        spec = ModelSpec.model_validate({**spec_json, "source": source, **extra})
        replica = Replica(f"scheme-{i}", "default", "scheme", "uid", "h100-0", (0,), 2**30)
        pod = pod_for(replica, spec, spec_json, mode="devicePlugin", worker_port=8000,
                      command=("python", "-m", "kvpilot.worker"))
        pod["metadata"].pop("ownerReferences")  # the owner is not there in a dry run
        out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                              input=json.dumps(pod), check=False)
        assert out.returncode == 0, (source, out.stderr)
        stored = json.loads(out.stdout)["spec"]
        assert stored.get("volumes", []) == pod["spec"].get("volumes", []), source
        assert [c["args"] for c in stored.get("initContainers", [])] == [
            c["args"] for c in pod["spec"].get("initContainers", [])], source
