"""The pure builders of the operator's objects, with exact expectations."""

from __future__ import annotations

import json

import pytest

from kvpilot.api import contract
from kvpilot.api.model import ModelSpec
from kvpilot.operator.objects import (
    Device, Replica, WeightsCache, claim_for, condition, endpoint, event_for, owner_reference,
    pod_for, selector_string, service_for, spec_hash, weights_for,
)
from kvpilot.operator.view import Failure, fetching, pod_failure

SPEC_JSON = {
    "weights": {"parameters": 8030261248, "dtype": "bf16"},
    "architecture": {"layers": 32, "attentionHeads": 32, "kvHeads": 8, "headDim": 128,
                     "maxContextTokens": 8192},
    "sla": {"contextTokens": 8192, "concurrentSequences": 16},
    "source": "pvc://models/llama-3-8b",
    "worker": {"resources": {"requests": {"cpu": "4", "memory": "32Gi"}},
               "engineArgs": ["--max-batch", "64"]},
}
SPEC = ModelSpec.model_validate(SPEC_JSON)
R = Replica("llama-1", "ml", "llama", "uid-1", "h100-0", (2, 3), 20 * 2**30, 65536)
LABELS = {"app.kubernetes.io/managed-by": "kvpilot", "kvpilot.dev/model": "llama",
          "app.kubernetes.io/component": "worker", "kvpilot.dev/replica": "llama-1"}
ANNOTATIONS = {"kvpilot.dev/node": "h100-0", "kvpilot.dev/gpus": "2,3",
               "kvpilot.dev/hbm-per-gpu": str(20 * 2**30), "kvpilot.dev/tensor-parallel": "2",
               "kvpilot.dev/kv-capacity-tokens": "65536"}


def test_owner_reference_makes_the_model_the_controller():
    assert owner_reference("llama", "uid-1") == {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model", "name": "llama", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}


def test_selector_string_is_sorted_and_stable():
    assert selector_string("llama") == (
        "app.kubernetes.io/managed-by=kvpilot,kvpilot.dev/model=llama")


def test_claim_asks_the_planned_gpus_with_the_hbm_budget_as_capacity():
    devices = [Device("gpu-2", "h100-0", "GPU-b", "NVIDIA H100 80GB HBM3"),
               Device("gpu-3", "h100-0", "GPU-c", "NVIDIA H100 80GB HBM3")]
    claim = claim_for(R, devices, "gpu.nvidia.com", "gpu.nvidia.com")
    assert claim == {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "llama-1", "namespace": "ml", "labels": LABELS,
                     "annotations": ANNOTATIONS,
                     "ownerReferences": [owner_reference("llama", "uid-1")]},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "gpu.nvidia.com", "allocationMode": "ExactCount", "count": 2,
            "selectors": [
                {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].productName == '
                                       '"NVIDIA H100 80GB HBM3"'}},
                {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].uuid in '
                                       '["GPU-b", "GPU-c"]'}},
            ],
            "capacity": {"requests": {"memory": str(20 * 2**30)}},
        }}]}},
    }


def test_claim_refuses_a_device_count_other_than_tp():
    with pytest.raises(ValueError, match="2 GPUs planned, 1 devices given"):
        claim_for(R, [Device("gpu-2", "h100-0", "GPU-b")], "gpu.nvidia.com", "gpu.nvidia.com")


def _pod(mode: str) -> dict:
    return pod_for(R, SPEC, SPEC_JSON, mode=mode, worker_port=8000,
                   command=("python", "-m", "kvpilot.worker"), drain_seconds=60)


def test_dra_pod_uses_the_claim_of_its_name_and_gets_the_model_as_env():
    pod = _pod("dra")
    assert pod["metadata"]["name"] == "llama-1"
    assert pod["metadata"]["labels"] == {**LABELS, "kvpilot.dev/serving": "true"}
    assert pod["metadata"]["annotations"] == {**ANNOTATIONS,
                                              "kvpilot.dev/spec-hash": spec_hash(SPEC_JSON)}
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "h100-0"}
    assert spec["resourceClaims"] == [{"name": "gpu", "resourceClaimName": "llama-1"}]
    assert "affinity" not in spec
    assert spec["terminationGracePeriodSeconds"] == 90
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["image"] == "kvpilot/worker:0.1.0"
    assert c["command"] == ["python", "-m", "kvpilot.worker"]
    assert c["args"] == ["--host", "$(POD_IP)", "--port", "8000", "--model",
                         "/weights/llama-3-8b", "--max-batch", "64"]
    assert c["volumeMounts"] == [{"name": "weights", "mountPath": "/weights", "readOnly": True},
                                 {"name": "dshm", "mountPath": "/dev/shm"}]  # TP 2: NCCL
    assert spec["volumes"] == [{"name": "weights", "persistentVolumeClaim": {
        "claimName": "models", "readOnly": True}}, {"name": "dshm", "emptyDir": {
            "medium": "Memory"}}]
    assert "initContainers" not in spec
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "32Gi"},
                              "claims": [{"name": "gpu"}]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert json.loads(env[contract.ENV_MODEL_SPEC]) == SPEC_JSON
    assert env[contract.ENV_MODEL_NAME] == "llama"
    assert env[contract.ENV_HBM_PER_GPU] == str(20 * 2**30)
    assert env[contract.ENV_TENSOR_PARALLEL] == "2"
    assert c["readinessProbe"]["httpGet"] == {"path": contract.PATH_READY, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": contract.PATH_HEALTH, "port": "http"}


def test_device_plugin_pod_takes_whole_gpus_and_requires_its_node():
    spec = _pod("devicePlugin")["spec"]
    assert "resourceClaims" not in spec
    (c,) = spec["containers"]
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": 2},
                              "limits": {"nvidia.com/gpu": 2}}
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["h100-0"]}]}]}


def test_default_image_replaces_only_the_builtin_default():
    pod = pod_for(R, SPEC, SPEC_JSON, mode="dra", worker_port=8000, command=("w",),
                  default_image="registry.local/worker:1")
    assert pod["spec"]["containers"][0]["image"] == "registry.local/worker:1"
    custom = ModelSpec.model_validate({**SPEC_JSON, "worker": {"image": "mine:2"}})
    pod = pod_for(R, custom, SPEC_JSON, mode="dra", worker_port=8000, command=("w",),
                  default_image="registry.local/worker:1")
    assert pod["spec"]["containers"][0]["image"] == "mine:2"


def test_condition_keeps_its_transition_time_while_its_status_holds():
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = condition("Ready", True, "R", "m", 3, old, "2026-02-02T00:00:00Z")
    assert same == {"type": "Ready", "status": "True", "reason": "R", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}
    flipped = condition("Ready", False, "R", "m", 3, old, "2026-02-02T00:00:00Z")
    assert flipped["lastTransitionTime"] == "2026-02-02T00:00:00Z"


def test_event_points_at_the_model():
    model = {"metadata": {"name": "llama", "namespace": "ml", "uid": "uid-1"}}
    ev = event_for(model, "Placed", "placed 1 replica", "2026-01-01T00:00:00Z", warning=True)
    assert ev["involvedObject"] == {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
                                    "name": "llama", "namespace": "ml", "uid": "uid-1"}
    assert (ev["type"], ev["reason"], ev["metadata"]["generateName"]) == (
        "Warning", "Placed", "llama.")


def test_spec_hash_ignores_how_many_replicas_run_but_not_what_they_run():
    h = spec_hash(SPEC_JSON)
    assert len(h) == 16
    scaled = {**SPEC_JSON, "replicas": 5, "maxReplicas": 9,
              "autoscaling": {"enabled": True}}
    assert spec_hash(scaled) == h
    assert spec_hash({**SPEC_JSON, "sla": {"contextTokens": 4096,
                                           "concurrentSequences": 16}}) != h
    assert spec_hash(dict(reversed(list(SPEC_JSON.items())))) == h  # key order


def _weights(source: str, cache: WeightsCache = WeightsCache(), **spec):
    return weights_for(ModelSpec.model_validate({**SPEC_JSON, "source": source, **spec}),
                       "reg/worker:1", cache)


READ_ONLY = [{"name": "weights", "mountPath": "/weights", "readOnly": True}]


def test_each_source_scheme_mounts_its_weights_read_only():
    assert weights_for(ModelSpec.model_validate(
        {k: v for k, v in SPEC_JSON.items() if k != "source"}), "img", WeightsCache()) is None
    w = _weights("file:///opt/llama")
    assert (w.model_path, w.volumes, w.mounts, w.init_containers) == ("/opt/llama", [], [], [])
    w = _weights("host:///var/lib/models/llama")
    assert (w.model_path, w.mounts, w.init_containers) == ("/weights", READ_ONLY, [])
    assert w.volumes == [{"name": "weights", "hostPath": {"path": "/var/lib/models/llama",
                                                          "type": "Directory"}}]
    w = _weights("pvc://models")
    assert (w.model_path, w.mounts) == ("/weights", READ_ONLY)
    w = _weights("oci://registry.example.com/models/llama:v1")
    assert (w.model_path, w.mounts, w.init_containers) == ("/weights", READ_ONLY, [])
    assert w.volumes == [{"name": "weights", "image": {
        "reference": "registry.example.com/models/llama:v1", "pullPolicy": "IfNotPresent"}}]


def test_hf_is_fetched_by_an_init_container_into_the_node_cache():
    w = _weights("hf://meta-llama/Llama-3.1-8B@v2", WeightsCache(hub_endpoint="http://hub:8080"),
                 sourceSecret="hub-token")
    assert w.model_path == "/weights/hf/meta-llama/Llama-3.1-8B/v2"
    assert w.mounts == READ_ONLY
    assert w.volumes == [{"name": "weights", "hostPath": {"path": "/var/cache/kvpilot/models",
                                                          "type": "DirectoryOrCreate"}}]
    (fetch,) = w.init_containers
    assert fetch == {
        "name": "fetch-weights", "image": "reg/worker:1",
        "command": ["python", "-m", "kvpilot.worker.fetch"],
        "args": ["hf://meta-llama/Llama-3.1-8B@v2", "--dest",
                 "/weights/hf/meta-llama/Llama-3.1-8B/v2"],
        "env": [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                {"name": "HF_HOME", "value": "/tmp/huggingface"},
                {"name": "HF_ENDPOINT", "value": "http://hub:8080"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token",
                                                                    "key": "HF_TOKEN"}}}],
        "volumeMounts": [{"name": "weights", "mountPath": "/weights"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": False,
                            "runAsUser": 0},
    }


def test_hf_without_a_node_cache_fetches_into_an_emptydir_as_non_root():
    w = _weights("hf://Qwen/Qwen2.5-0.5B-Instruct", WeightsCache(host_path=""))
    assert w.model_path == "/weights/hf/Qwen/Qwen2.5-0.5B-Instruct/main"
    assert w.volumes == [{"name": "weights", "emptyDir": {}}]
    (fetch,) = w.init_containers
    assert fetch["securityContext"]["runAsNonRoot"] is True
    assert [e["name"] for e in fetch["env"]] == ["HF_HUB_DISABLE_TELEMETRY", "HF_HOME"]


def test_a_pod_carries_its_weights_volume_and_fetch():
    spec = ModelSpec.model_validate({**SPEC_JSON, "source": "hf://org/tiny"})
    pod = pod_for(R, spec, SPEC_JSON, mode="dra", worker_port=8000, command=("w",),
                  default_image="registry.local/worker:1")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fetch-weights"]
    assert pod["spec"]["initContainers"][0]["image"] == "registry.local/worker:1"
    assert pod["spec"]["volumes"][0]["name"] == "weights"
    assert "/weights/hf/org/tiny/main" in pod["spec"]["containers"][0]["args"]


def test_the_service_selects_the_serving_workers_of_its_model():
    assert service_for("llama", "ml", "uid-1") == {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "llama", "namespace": "ml",
                     "labels": {"app.kubernetes.io/managed-by": "kvpilot",
                                "kvpilot.dev/model": "llama"},
                     "ownerReferences": [owner_reference("llama", "uid-1")]},
        "spec": {"type": "ClusterIP",
                 "selector": {"app.kubernetes.io/managed-by": "kvpilot",
                              "kvpilot.dev/model": "llama",
                              "app.kubernetes.io/component": "worker",
                              "kvpilot.dev/serving": "true"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http",
                            "protocol": "TCP"}]},
    }
    assert endpoint("llama", "ml") == "http://llama.ml.svc/v1"


def _status(**status) -> dict:
    return {"metadata": {"name": "p"}, "status": status}


def test_a_failed_fetch_or_worker_is_read_from_its_termination_message():
    mismatch = "WeightsMismatch: architecture.layers: the Model says 32, config.json says 2"
    crash_loop = {"name": "worker", "restartCount": 3,
                  "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                  "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                               "message": mismatch}}}
    assert pod_failure(_status(containerStatuses=[crash_loop])) == Failure(
        "WeightsMismatch", "architecture.layers: the Model says 32, config.json says 2")
    # from the logs (FallbackToLogsOnError): the last reason line counts
    logs = "loading\n2026 ERROR kvpilot.worker: WeightsUnavailable: hub refused (401)\n"
    fetch = {"name": "fetch-weights", "restartCount": 0,
             "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": logs}}}
    assert pod_failure(_status(initContainerStatuses=[fetch])) == Failure(
        "WeightsUnavailable", "hub refused (401)")
    # no reason line: the kubelet's words, by container
    plain = {"name": "worker", "restartCount": 2, "state": {"terminated": {
        "exitCode": 137, "reason": "OOMKilled", "message": ""}}}
    assert pod_failure(_status(containerStatuses=[plain])) == Failure(
        "WorkerCrashLoop", "container worker exited with code 137 (OOMKilled): exit code 137")
    secret = {"name": "fetch-weights", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "hub" not found'}}}
    assert pod_failure(_status(initContainerStatuses=[secret])) == Failure(
        "WeightsUnavailable",
        'container fetch-weights: CreateContainerConfigError: secret "hub" not found')
    pvc = {"type": "PodScheduled", "status": "False",
           "message": '0/3 nodes are available: persistentvolumeclaim "models" not found.'}
    assert pod_failure(_status(conditions=[pvc])).reason == "WeightsUnavailable"


def test_a_recovered_or_running_pod_has_no_failure():
    recovered = {"name": "worker", "restartCount": 1, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "message": "LoadFailed: x"}}}
    assert pod_failure(_status(containerStatuses=[recovered])) is None
    done = {"name": "fetch-weights", "state": {"terminated": {"exitCode": 0}}}
    assert pod_failure(_status(initContainerStatuses=[done])) is None
    assert pod_failure(_status(conditions=[{"type": "PodScheduled", "status": "False",
                                            "message": "0/3 nodes: insufficient memory"}])) \
        is None
    running = {"name": "fetch-weights", "state": {"running": {}}}
    assert fetching(_status(initContainerStatuses=[running]))
    assert not fetching(_status(initContainerStatuses=[done]))


def test_only_a_tensor_parallel_pod_gets_a_shared_memory_volume():
    one = Replica("llama-0", "ml", "llama", "uid-1", "h100-0", (0,), 20 * 2**30)
    spec = ModelSpec.model_validate({k: v for k, v in SPEC_JSON.items() if k != "source"})
    pod = pod_for(one, spec, SPEC_JSON, mode="dra", worker_port=8000, command=("w",))
    assert "volumes" not in pod["spec"]
    assert "volumeMounts" not in pod["spec"]["containers"][0]
