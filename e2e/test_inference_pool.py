"""InferencePools on the real control plane, against the CRD of a published release of
the Gateway API Inference Extension (e2e.inference_extension, v1.6.2).

`helm install` of the chart, then the operator as the chart runs it (its settings, its
ServiceAccount's token), in the chart's default ``inferencePool.enabled: auto``:

- without the extension's CRD, Models are served as ever and the operator says once,
  without an error, that it makes no InferencePools;
- the CRD installed while the operator runs: every Model gets its InferencePool, which
  the API server accepted against the release's schema (its defaults filled in), owned
  by the Model, selecting exactly the Model's serving worker pods, as its Service does,
  on the workers' port, naming the endpoint picker the chart's values give;
- a pool edited by hand is put back; a pool goes with its Model (garbage collector);
- the operator used the chart's grants on InferencePools, and was refused nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kvpilot.operator.objects import owner_reference, serving_labels

from e2e.chart import NAMESPACE
from e2e.cluster import Cluster
from e2e.fleet import fleet_cluster
from e2e.inference_extension import VERSION, pool_crd
from e2e.operator import chart_operator, wait_for
from e2e.fleet import FLEET, model
from e2e.state import running
from tests.chart_helpers import grants

SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:kvpilot"
POOL_CRD = "inferencepools.inference.networking.k8s.io"
CHAT = model("chat", 2)
SOLO = model("solo", 1)
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("pool-cluster"), FLEET, dra=True) as c:
        yield c


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    crd = pool_crd()  # fetched (once) before the cluster's time is spent on it
    op = chart_operator(cluster, tmp_path_factory.mktemp("pool-run"), "e2e-pools").start()
    try:
        yield op, crd
    finally:
        op.stop()


def pool(cluster: Cluster, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "inferencepool", name, "-n", "default", "-o", "json",
                           check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def problems(log: str) -> list[str]:
    """Errors, refusals and kopf's warning of unserved resources in the operator's log.
    Not kopf's retry of its first watch of a CRD just established, which the API server
    may answer 429 while that resource's storage starts (kopf logs it as an error)."""
    return [line for line in log.splitlines()
            if (" ERROR " in line or "Traceback" in line or "HTTP 403" in line
                or "Unresolved resources" in line or "forbidden" in line.lower())
            and not ("will retry" in line and "storage is (re)initializing" in line)]


def test_without_the_crd_models_are_served_and_no_pool_is_asked_for(cluster, operator):
    op, _ = operator
    cluster.apply([CHAT])
    wait_for("chat x2 running", lambda: running(cluster, {"chat": 2}), 120, log=op.log)
    wait_for("chat's Service", lambda: cluster.kubectl(
        "get", "service", "chat", "-n", "default", check=False).returncode == 0, 30,
        log=op.log)
    missing = cluster.kubectl("get", "inferencepools", "-A", check=False)
    assert missing.returncode != 0 and "doesn't have a resource type" in missing.stderr
    log = op.log()
    assert f"{POOL_CRD} is not served: no InferencePools" in log, log[-3000:]
    assert log.count(f"{POOL_CRD} is not served") == 1, log[-3000:]
    assert not problems(log), problems(log)


def test_the_crd_installed_later_brings_each_model_its_pool(cluster, operator):
    op, crd = operator
    assert yaml.safe_load(crd.read_text())["metadata"]["annotations"][
        "inference.networking.k8s.io/bundle-version"] == VERSION
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{POOL_CRD}",
                    "--timeout=60s", timeout=70)
    chat = wait_for("chat's InferencePool", lambda: pool(cluster, "chat"), 60, log=op.log)
    cluster.apply([SOLO])  # a Model that comes after the CRD
    solo = wait_for("solo's InferencePool", lambda: pool(cluster, "solo"), 60, log=op.log)

    for p, name in ((chat, "chat"), (solo, "solo")):
        uid = cluster.get("model", name)["metadata"]["uid"]
        assert p["metadata"]["ownerReferences"] == [owner_reference(name, uid)]
        # as stored: the release's schema filled in its defaults (appProtocol, group, kind)
        assert p["spec"] == {
            "selector": {"matchLabels": serving_labels(name)},
            "targetPorts": [{"number": 8000}],  # the chart's worker.port
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002},
                                  "failureMode": "FailClose", "group": "", "kind": "Service"},
            "appProtocol": "http"}
        assert p["spec"]["selector"]["matchLabels"] == cluster.get(
            "service", name)["spec"]["selector"]
    reps = wait_for("solo running", lambda: running(cluster, {"chat": 2, "solo": 1}), 120,
                    log=op.log)
    selector = ",".join(f"{k}={v}" for k, v in chat["spec"]["selector"]["matchLabels"].items())
    selected = {p["metadata"]["name"] for p in cluster.get("pods", "-l", selector)["items"]}
    assert selected == {n for n in reps if n.startswith("chat-")}

    # the release's own rules are in force: a picker Service needs its port
    bad = {**chat, "metadata": {"name": "bad", "namespace": "default"},
           "spec": {**chat["spec"], "endpointPickerRef": {"name": "bad-epp"}}}
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-",
                              input=json.dumps(bad), check=False)
    assert refused.returncode != 0
    assert "port is required when kind is 'Service'" in refused.stderr, refused.stderr


def test_a_pool_edited_by_hand_is_put_back(cluster, operator):
    op, _ = operator
    before = pool(cluster, "chat")["spec"]
    cluster.kubectl("patch", "inferencepool", "chat", "-n", "default", "--type=merge",
                    "-p", json.dumps({"spec": {"targetPorts": [{"number": 9999}],
                                               "selector": {"matchLabels": {"team": "a"}}}}))
    assert pool(cluster, "chat")["spec"] != before
    wait_for("chat's pool put back", lambda: pool(cluster, "chat")["spec"] == before, 30,
             log=op.log)


def test_a_pool_goes_with_its_model(cluster, operator):
    op, _ = operator
    cluster.kubectl("delete", "model", "solo", "--wait=true", "--timeout=90s", timeout=100)
    wait_for("solo's pool collected", lambda: pool(cluster, "solo") is None, 60, log=op.log)
    assert pool(cluster, "chat") is not None


def resource(event: dict[str, Any]) -> str:
    return (event.get("objectRef") or {}).get("resource", "")


def test_the_operator_used_its_pool_grants_and_was_refused_nothing(cluster, operator):
    op, _ = operator
    op.stop()  # a watch is audited when it ends
    rules = cluster.get("clusterrole", "kvpilot-operator")["rules"]
    granted = {(verb, res) for (group, res, _), verbs in grants(rules).items()
               if group == "inference.networking.k8s.io" for verb in verbs}
    assert granted == {("list", "inferencepools"), ("watch", "inferencepools"),
                       ("create", "inferencepools"), ("patch", "inferencepools")}

    def calls() -> list[dict[str, Any]]:
        return [e for e in cluster.audit_requests(SERVICE_ACCOUNT)
                if not e.get("userAgent", "").startswith("kubectl")]

    def used() -> set[tuple[str, str]]:
        return {(e["verb"], resource(e)) for e in calls()
                if e.get("responseStatus", {}).get("code", 500) < 400}

    wait_for("the pool grants used, in the audit log", lambda: granted <= used(), 15)
    assert {c for c in used() if c[1] == "inferencepools"} == granted
    # one create per Model: the pool index (watched from the moment the CRD came)
    # and the loop's expectations kept it from asking twice
    assert sorted(e["responseStatus"]["code"] for e in calls()
                  if e["verb"] == "create" and resource(e) == "inferencepools") == [201, 201]
    refused = [(e["verb"], e.get("requestURI")) for e in calls()
               if e.get("responseStatus", {}).get("code") == 403]
    assert not refused, refused
    assert not problems(op.log()), problems(op.log())
