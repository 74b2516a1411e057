"""The generated Model CRD in a real API server: schema, CEL rules, columns, scale."""

from __future__ import annotations

import json

import pytest
import yaml

from kvpilot.api.files import FileError, load_models
from kvpilot.api.model import Model
from tests.conftest import EXAMPLES, llama_spec
from tests.invalid_models import INVALID, VALID, document


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


MODELS_PATH = "/apis/kvpilot.dev/v1alpha1/namespaces/default/models"


@pytest.fixture(scope="module")
def api(cluster):
    with cluster.http() as client:
        yield client


def post(api, body: str, content_type: str = "application/json"):
    return api.post(MODELS_PATH, params={"fieldValidation": "Strict"}, content=body,
                    headers={"Content-Type": content_type})


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in INVALID])
def test_invalid_model_is_refused_naming_field_and_fix(api, case):
    doc = document(case, llama_spec(), name=f"bad-{case.id}")
    answer = post(api, json.dumps(doc))
    assert answer.status_code in (400, 422), f"accepted: {case}"
    message = answer.json()["message"]
    assert case.server_text in message, message
    assert (case.server_field or case.field) in message, message


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in VALID])
def test_edge_model_is_accepted_and_loads_back(api, case):
    doc = document(case, llama_spec(), name=f"ok-{case.id}"[:50])
    answer = post(api, json.dumps(doc))
    assert answer.status_code == 201, answer.text
    stored = answer.json()
    # what the API server stores (with its defaults) is what kvpilot reads
    model = Model.model_validate({k: stored[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    assert model.spec == Model.model_validate(doc).spec


def test_duplicate_yaml_keys_are_refused_by_both(api, tmp_path):
    text = yaml.safe_dump(document(VALID[0], llama_spec(), name="dup")).replace(
        "spec:\n", "spec:\n  replicas: 2\n  replicas: 3\n", 1)
    answer = post(api, text, "application/yaml")
    assert answer.status_code in (400, 422) and "replicas" in answer.json()["message"]
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(FileError, match="duplicate key 'replicas'"):
        load_models(path)


def test_explain_names_types_and_defaults(cluster):
    # kubectl explain shows an int-or-string field as <Object> and no defaults at all,
    # so the descriptions say both
    out = " ".join(cluster.kubectl("explain", "models.spec.runtimeOverhead").stdout.split())
    assert "Integer or string. Default: 2Gi." in out, out
    out = " ".join(cluster.kubectl("explain", "models.spec.tensorParallel").stdout.split())
    assert "Integer or string. Default: auto." in out, out
    out = " ".join(cluster.kubectl("explain", "models.spec.replicas").stdout.split())
    assert "Desired replicas (scale target). Default: 1." in out, out


def test_printer_columns(cluster):
    create(cluster, model("columns", llama_spec(replicas=2, maxReplicas=4)))
    cluster.kubectl("patch", "model", "columns", "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {"replicas": 2, "readyReplicas": 1, "tensorParallel": 1,
                                           "hbmPerGpu": "33.0 GiB", "kvPressurePercent": 42,
                                           "reason": "FetchingWeights",
                                           "endpoint": "http://columns.default.svc/v1"}}))
    out = cluster.kubectl("get", "models", "columns").stdout.splitlines()
    assert out[0].split() == ["NAME", "REPLICAS", "READY", "TP", "HBM/GPU", "KV%", "REASON",
                              "ENDPOINT", "AGE"]
    assert out[1].split()[:9] == ["columns", "2", "1", "1", "33.0", "GiB", "42",
                                  "FetchingWeights", "http://columns.default.svc/v1"]


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

