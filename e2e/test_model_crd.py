"""The generated Model CRD in a real API server: schema, CEL rules, columns, scale."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import EXAMPLES, llama_spec
from tests.invalid_models import INVALID, apply_overrides


def model(name: str, spec: dict) -> dict:
    return {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def create(cluster, obj, check=True):
    return cluster.kubectl("create", "-f", "-", input=json.dumps(obj), check=check)


def get(cluster, name) -> dict:
    return cluster.get("model", name)


def test_crd_is_established_with_short_name(cluster):
    out = cluster.kubectl("api-resources", "--api-group=kvpilot.dev", "-o", "wide").stdout
    assert "models" in out and "kvm" in out and "Model" in out


def test_examples_are_accepted_and_defaulted(cluster):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        cluster.kubectl("apply", "-f", str(path))
    names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in EXAMPLES.glob("*.yaml")}
    listed = cluster.get("kvm")["items"]
    assert names <= {m["metadata"]["name"] for m in listed}
    mistral = get(cluster, "mistral-7b")["spec"]
    # server-side defaults come from the pydantic defaults
    assert mistral["kvCacheDtype"] == "bf16"
    assert mistral["minReplicas"] == 1
    assert mistral["autoscaling"] == {
        "enabled": False, "targetKvPressurePercent": 75, "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300, "cooldownSeconds": 60,
    }
    assert mistral["worker"]["image"] == "kvpilot/worker:0.1.0"
    assert mistral["runtimeOverhead"] == "2Gi"


@pytest.mark.parametrize("overrides, message", [pytest.param(o, m, id=i) for i, o, _, m in INVALID])
def test_invalid_model_is_refused_with_message(cluster, overrides, message):
    name = "bad-" + str(abs(hash(json.dumps(overrides, sort_keys=True))) % 10**8)
    proc = create(cluster, model(name, apply_overrides(llama_spec(), overrides)), check=False)
    assert proc.returncode != 0, f"accepted: {overrides}"
    assert message in proc.stderr, proc.stderr


def test_printer_columns(cluster):
    create(cluster, model("columns", llama_spec(replicas=2, maxReplicas=4)))
    cluster.kubectl("patch", "model", "columns", "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {"replicas": 2, "readyReplicas": 1, "tensorParallel": 1,
                                           "hbmPerGpu": "33.0 GiB", "kvPressurePercent": 42}}))
    out = cluster.kubectl("get", "models", "columns").stdout.splitlines()
    assert out[0].split() == ["NAME", "REPLICAS", "READY", "TP", "HBM/GPU", "KV%", "AGE"]
    assert out[1].split()[:7] == ["columns", "2", "1", "1", "33.0", "GiB", "42"]


def test_kubectl_scale_uses_the_scale_subresource(cluster):
    create(cluster, model("scaled", llama_spec(replicas=1, maxReplicas=4)))
    cluster.kubectl("scale", "model/scaled", "--replicas=3")
    assert get(cluster, "scaled")["spec"]["replicas"] == 3
    with cluster.http() as client:
        scale = client.get("/apis/kvpilot.dev/v1alpha1/namespaces/default/models/scaled/scale")
    assert scale.status_code == 200 and scale.json()["spec"]["replicas"] == 3
    # the CEL bounds apply to scale requests too
    proc = cluster.kubectl("scale", "model/scaled", "--replicas=9", check=False)
    assert proc.returncode != 0 and "replicas must be <= maxReplicas" in proc.stderr
    assert get(cluster, "scaled")["spec"]["replicas"] == 3


def test_helm_chart_lints_and_installs(cluster, tmp_path):
    from e2e import build

    helm = str(build.binary("helm"))
    env_args = [f"--kubeconfig={cluster.kubeconfig}"]
    chart = str(EXAMPLES.parent / "helm" / "kvpilot")
    run = lambda *a: subprocess.run([helm, *a], capture_output=True, text=True, timeout=120,
                                    env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    lint = run("lint", "--strict", chart)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    bad = run("lint", chart, "--set", "operator.replicas=2")
    assert bad.returncode != 0 and "additional properties" in (bad.stdout + bad.stderr).lower()
    install = run("install", "kvpilot", chart, "-n", "kvpilot-system", "--create-namespace",
                  "--wait", *env_args)
    assert install.returncode == 0, install.stderr
    assert "kubectl get models" in install.stdout
    listed = run("list", "-n", "kvpilot-system", "-o", "json", *env_args)
    assert json.loads(listed.stdout)[0]["status"] == "deployed"
    assert run("uninstall", "kvpilot", "-n", "kvpilot-system", *env_args).returncode == 0
    # the CRD (and every Model) survives an uninstall
    cluster.kubectl("get", "crd", "models.kvpilot.dev")
