"""The chart on the real control plane: what it renders is accepted, `helm install` sets
up the CRD and the operator, and the operator does a whole scenario with nothing but the
chart's RBAC; `helm upgrade` carries a CRD change, `helm uninstall` keeps the CRD and the
Models, and a CRD applied with kubectl is adopted the way docs/install.md says.

The operator runs out of cluster as a process (KWOK's pods run nothing), with the token
of the chart's ServiceAccount and the env of the chart's Deployment. The API server
audits every request of that ServiceAccount, reads included, so a 403 anywhere is seen.
One control plane for the module, without kvpilot's CRD: the chart installs it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import build
from e2e.cluster import AUDITED_NAMESPACE, Cluster
from e2e.fake_workers import FakeWorkers
from e2e.fleet import fleet_cluster
from e2e.operator import OperatorProcess, wait_for
from e2e.fleet import autoscaled
from e2e.fleet import FLEET, LLAMA
from e2e.state import check_consistent, live, replicas, running
from e2e.chart import (
    CHART, NAMESPACE, OPERATOR, RELEASE, chart_settings, kube_helm, service_account_kubeconfig,
)
from tests.chart_helpers import ALL_FEATURES, grants, template

SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:kvpilot"
assert NAMESPACE == AUDITED_NAMESPACE  # where the API server audits reads too


# Named as the session's fixture, so that none of these tests starts that control plane too.
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("helm-cluster"), FLEET, dra=True) as c:
        yield c


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("helm-home")


def monitor_crd(kind: str, endpoints: str, endpoint: dict[str, Any],
                namespaces: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for a Prometheus Operator CRD: only the fields the chart sets, typed as
    monitoring.coreos.com/v1 types them. The dry run validates fields strictly, so a
    field the stand-in does not declare is refused, not dropped."""
    labels = {"type": "object", "additionalProperties": {"type": "string"}}
    spec = {"type": "object", "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": labels}},
        "namespaceSelector": {"type": "object", "properties": namespaces},
        endpoints: {"type": "array", "items": {"type": "object", "properties": endpoint}}}}
    plural = kind.lower() + "s"
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {
                                       "type": "object", "properties": {"spec": spec}}}}]}}


STRING = {"type": "string"}
MONITOR_CRDS = [
    monitor_crd("ServiceMonitor", "endpoints",
                {"port": STRING, "path": STRING, "interval": STRING},
                {"matchNames": {"type": "array", "items": STRING}}),
    monitor_crd("PodMonitor", "podMetricsEndpoints",
                {"port": STRING, "path": STRING, "interval": STRING},
                {"any": {"type": "boolean"}}),
]


def dry_run(cluster: Cluster, manifest: str, check: bool = True):
    return cluster.kubectl("apply", "--dry-run=server", "--server-side",
                           "--field-manager=helm-e2e", "-f", "-", input=manifest, check=check)


def test_what_the_chart_renders_is_accepted_by_the_api_server(cluster):
    cluster.apply(MONITOR_CRDS)
    for crd in MONITOR_CRDS:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}")
    cluster.kubectl("create", "namespace", NAMESPACE)
    for values in (None, ALL_FEATURES):
        manifest = template(values).stdout
        out = dry_run(cluster, manifest).stdout
        applied = [line for line in out.splitlines() if "(server dry run)" in line]
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        assert len(applied) == len(docs), out
    # the dry run does check: a value the schema lets through but Kubernetes refuses
    bad = template({"operator": {"resources": {"requests": {"cpu": "lots"}}}}).stdout
    proc = dry_run(cluster, bad, check=False)
    assert proc.returncode != 0 and "quantities must match" in proc.stderr, proc.stderr


def test_install_serves_the_crd_and_runs_the_operator(cluster, home):
    out = kube_helm(cluster, home, "install", RELEASE, str(CHART), "-n", NAMESPACE,
                    "--create-namespace", "--wait", "--timeout=120s").stdout
    assert f"rollout status deployment/{OPERATOR}" in out  # NOTES
    cluster.kubectl("wait", "--for=condition=Established", "crd/models.kvpilot.dev")
    crd = cluster.get("crd", "models.kvpilot.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # served, and validated by its schema
    proc = cluster.kubectl("apply", "-f", "-", check=False, input=json.dumps(
        {**LLAMA, "metadata": {"name": "bad", "namespace": "default"},
         "spec": {**LLAMA["spec"], "replicas": 99}}))
    assert proc.returncode != 0 and "replicas must be <= maxReplicas" in proc.stderr
    deployment = cluster.get("deployment", "-n", NAMESPACE, OPERATOR)
    assert deployment["status"].get("readyReplicas") == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kvpilot"
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    listed = json.loads(kube_helm(cluster, home, "list", "-n", NAMESPACE, "-o", "json").stdout)
    assert [(r["name"], r["status"], r["revision"]) for r in listed] == [
        (RELEASE, "deployed", "1")]
    # namespace users manage Models through the cluster's edit and view roles
    for user, role in (("alice", "edit"), ("bob", "view")):
        cluster.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                        f"--user={user}", "-n", "default")

    def can(user: str, verb: str, what: str, *flags: str) -> bool:
        return cluster.kubectl("auth", "can-i", verb, what, *flags, "-n", "default",
                               f"--as={user}", check=False).stdout.strip() == "yes"

    wait_for("edit and view aggregated", lambda: can("alice", "create", "models.kvpilot.dev")
             and can("bob", "list", "models.kvpilot.dev"), 30)
    assert can("alice", "patch", "models.kvpilot.dev", "--subresource=scale")
    assert not can("alice", "patch", "models.kvpilot.dev", "--subresource=status")  # operator's
    assert not can("bob", "delete", "models.kvpilot.dev")


def resource(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    return ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def test_the_operator_does_a_whole_scenario_with_the_charts_rbac_alone(cluster, tmp_path):
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "sa-kubeconfig")
    # the token really is the ServiceAccount's: it may not read secrets
    denied = subprocess.run([str(build.binary("kubectl")), f"--kubeconfig={kubeconfig}",
                             "get", "secrets", "-A"], capture_output=True, text=True,
                            timeout=60)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    for verb, what in (("list", "secrets"), ("create", "deployments"), ("delete", "nodes"),
                       ("update", "leases/someone-else")):
        can = cluster.kubectl("auth", "can-i", verb, what, "-n", NAMESPACE,
                              f"--as={SERVICE_ACCOUNT}", check=False).stdout.strip()
        assert can == "no", (verb, what)

    settings = chart_settings(cluster)
    assert settings["lease_name"] == OPERATOR and settings["namespace"] == NAMESPACE
    settings.pop("identity")
    # quicker than in production, and no ports, which other tests on this machine may hold
    settings.update(reconcile_seconds="2", lease_seconds="3", scrape_seconds="1",
                    drain_timeout_seconds="10", metrics_port="0", health_port="0")
    fakes = FakeWorkers(cluster).start()
    op = OperatorProcess(cluster, tmp_path / "operator.log", identity="helm-e2e",
                         kubeconfig=kubeconfig, **settings)
    op.start()
    try:
        fakes.set("grow", pressure=0.95)
        cluster.apply([LLAMA, autoscaled("grow")])
        reps = wait_for("llama x2 and grow scaled up to 2", lambda: running(
            cluster, {"llama": 2, "grow": 2}), 120, log=op.log)
        check_consistent(cluster, reps)
        fakes.set("grow", pressure=0.1)
        wait_for("grow drained back to 1", lambda: len(live(cluster, "grow")) == 1, 90,
                 log=op.log)
        cluster.kubectl("delete", "model", "llama", "--wait=true", "--timeout=90s",
                        timeout=100)
        assert not [n for n in replicas(cluster) if n.startswith("llama-")]
    finally:
        op.stop()
        fakes.stop()

    log = op.log()
    assert "acquired lease" in log, log[-3000:]
    assert "HTTP 403" not in log and "forbidden" not in log.lower(), log[-6000:]
    rules = (cluster.get("clusterrole", OPERATOR)["rules"]
             + cluster.get("role", "-n", NAMESPACE, OPERATOR)["rules"])
    # InferencePools are not served here (no CRD): e2e/test_inference_pool.py checks
    # those grants, on a cluster with the Gateway API Inference Extension's CRD
    granted = {(verb, res) for (group, res, _), verbs in grants(rules).items()
               for verb in verbs if group != "inference.networking.k8s.io"}

    def calls() -> list[dict[str, Any]]:
        # the ServiceAccount's, but for this test's own kubectl get secrets above
        return [e for e in cluster.audit_requests(SERVICE_ACCOUNT)
                if not e.get("userAgent", "").startswith("kubectl")]

    def used() -> Counter:
        return Counter((e["verb"], resource(e)) for e in calls()
                       if e.get("responseStatus", {}).get("code", 500) < 400)

    # a watch is audited when it ends, which the API server sees just after the stop
    wait_for("the operator's watches in the audit log", lambda: granted <= set(used()), 15)
    refused = [(e["verb"], e.get("requestURI")) for e in calls()
               if e.get("responseStatus", {}).get("code") == 403]
    assert not refused, refused
    made = used()
    print("the operator's calls:", dict(sorted(made.items())))
    # every grant the chart makes was used, so the chart grants no more than it needs
    assert granted == {call for call in made if call[1]}, (  # [1] == "": discovery
        f"granted, never used: {sorted(granted - set(made))}; "
        f"used, not granted: {sorted(set(made) - granted)}")


def test_upgrade_carries_a_crd_change_and_new_values(cluster, home, tmp_path):
    chart = tmp_path / "kvpilot"
    shutil.copytree(CHART, chart)
    # the next chart version: a new optional field in the Model's spec
    crd_file = chart / "files" / "crds" / "models.kvpilot.dev.yaml"
    header, _, body = crd_file.read_text().partition("\n")
    crd = yaml.safe_load(body)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["priorityClassName"] = {"type": "string", "maxLength": 253}
    crd_file.write_text(header + "\n" + yaml.safe_dump(crd, sort_keys=False))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = "0.1.1"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))

    with_field = {**LLAMA, "metadata": {"name": "prioritized", "namespace": "default"},
                  "spec": {**LLAMA["spec"], "priorityClassName": "high"}}
    before = cluster.kubectl("apply", "-f", "-", input=json.dumps(with_field), check=False)
    assert before.returncode != 0 and 'unknown field "spec.priorityClassName"' in before.stderr

    kube_helm(cluster, home, "upgrade", RELEASE, str(chart), "-n", NAMESPACE, "--wait",
              "--timeout=120s", "--reuse-values", "--set", "worker.scrapeSeconds=5")
    served = cluster.get("crd", "models.kvpilot.dev")["spec"]["versions"][0]["schema"]
    assert "priorityClassName" in served["openAPIV3Schema"]["properties"]["spec"]["properties"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(with_field))
    assert cluster.get("model", "prioritized")["spec"]["priorityClassName"] == "high"
    assert chart_settings(cluster)["scrape_seconds"] == "5"
    # Models of the first release are untouched
    assert cluster.get("model", "grow")["metadata"]["name"] == "grow"
    listed = json.loads(kube_helm(cluster, home, "list", "-n", NAMESPACE, "-o", "json").stdout)
    assert [(r["chart"], r["status"], r["revision"]) for r in listed] == [
        ("kvpilot-0.1.1", "deployed", "2")]


def gone(cluster: Cluster, *what: str) -> bool:
    return cluster.kubectl("get", *what, check=False).returncode != 0


def test_uninstall_keeps_the_crd_and_models_and_a_reinstall_adopts_them(cluster, home):
    kube_helm(cluster, home, "uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    for what in (("deployment", "-n", NAMESPACE, OPERATOR),
                 ("serviceaccount", "-n", NAMESPACE, "kvpilot"),
                 ("role", "-n", NAMESPACE, OPERATOR), ("clusterrole", OPERATOR),
                 ("clusterrolebinding", OPERATOR)):
        assert gone(cluster, *what), what
    cluster.kubectl("get", "crd", "models.kvpilot.dev")
    assert {m["metadata"]["name"] for m in cluster.get("models", "-A")["items"]} >= {
        "grow", "prioritized"}

    kube_helm(cluster, home, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--wait",
              "--timeout=120s")
    cluster.kubectl("get", "deployment", "-n", NAMESPACE, OPERATOR)
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    labels = cluster.get("crd", "models.kvpilot.dev")["metadata"]["labels"]
    assert labels["helm.sh/chart"] == f"kvpilot-{version}"


def documented_adoption() -> list[list[str]]:
    """The kubectl commands docs/install.md gives for handing a CRD to the release."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "install.md").read_text()
    block = text.split("hand it to the release first:", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines() if line.strip()]


def test_a_crd_applied_with_kubectl_is_adopted_as_the_docs_say(cluster, home):
    kube_helm(cluster, home, "uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    # as `kubectl apply -f crds/` leaves it: no Helm ownership
    cluster.kubectl("label", "crd", "models.kvpilot.dev", "app.kubernetes.io/managed-by-")
    cluster.kubectl("annotate", "crd", "models.kvpilot.dev", "meta.helm.sh/release-name-",
                    "meta.helm.sh/release-namespace-")
    args = ("install", RELEASE, str(CHART), "-n", NAMESPACE, "--wait", "--timeout=120s")
    refused = kube_helm(cluster, home, *args, check=False)
    assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr
    commands = documented_adoption()
    assert [c[:2] for c in commands] == [["label", "crd"], ["annotate", "crd"]]
    for command in commands:
        cluster.kubectl(*command)
    kube_helm(cluster, home, *args)
    assert cluster.get("model", "grow")["metadata"]["name"] == "grow"

