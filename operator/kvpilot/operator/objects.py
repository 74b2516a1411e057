"""Pure builders of the Kubernetes objects the operator writes: pods, claims, Services,
InferencePools, status, events.

Handlers only send what these return, so every object is tested here with exact
expectations, without a cluster. Names and labels are deterministic: the replica
``<model>-<i>`` is a pod of that name and, in DRA mode, a ResourceClaim of the same name,
both owned by the Model, so an operator restarted at any point finds what it made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from kvpilot.api import contract
from kvpilot.api.gpus import RESOURCE_GPU
from kvpilot.api.model import API_VERSION, KIND, ModelSpec
from kvpilot.api.source import hf_cache_path, parse_source

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kvpilot"
SELECTOR = f"{MANAGED_BY}={MANAGER}"  # every pod and claim the operator makes
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT_WORKER = "worker"
LABEL_MODEL = "kvpilot.dev/model"
LABEL_REPLICA = "kvpilot.dev/replica"
# On worker pods: "true" while the replica takes new requests, "false" from the moment its
# drain starts. The Model's Service selects "true", so a draining worker leaves the
# endpoints at once, not after its readiness probe has failed enough times.
LABEL_SERVING = "kvpilot.dev/serving"
ANN_NODE = "kvpilot.dev/node"
ANN_GPUS = "kvpilot.dev/gpus"
ANN_HBM = "kvpilot.dev/hbm-per-gpu"
ANN_TP = "kvpilot.dev/tensor-parallel"
ANN_KV_TOKENS = "kvpilot.dev/kv-capacity-tokens"
# The part of the Model's spec a replica is built from, hashed, on its pod and its claim:
# a replica whose hash is not the Model's is replaced (see ``reconcile``).
ANN_SPEC_HASH = "kvpilot.dev/spec-hash"
# Fields that change how many replicas run, not what one runs: no rollout for them.
SCALING_FIELDS = ("replicas", "minReplicas", "maxReplicas", "autoscaling")
# Set on a pod when its scale-down begins (an RFC 3339 time): the worker is asked to
# drain, and the pod goes once the worker reports drained or the drain timeout passes.
# On the pod, not in memory, so a restarted operator carries on with the same drain.
ANN_DRAIN = "kvpilot.dev/drain-started"
CLAIM_REQUEST = "gpu"
WORKER_CONTAINER = "worker"
DEFAULT_WORKER_IMAGE = "kvpilot/worker:0.1.0"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# Where a replica's weights are mounted in its containers, and the init container that
# fetches hf:// sources into the weights cache.
WEIGHTS_VOLUME = "weights"
WEIGHTS_MOUNT = "/weights"
FETCH_CONTAINER = "fetch-weights"
SHM_VOLUME = "dshm"  # /dev/shm of a tensor-parallel replica (the runtime's is 64 MiB)
HUB_TOKEN_KEY = "HF_TOKEN"  # the key of spec.sourceSecret that holds the hub token
SERVICE_PORT = 80
# Gateway API Inference Extension: an InferencePool per Model where its CRD is served.
POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_KIND = "InferencePool"
POOL_CRD = f"inferencepools.{POOL_GROUP}"  # the CustomResourceDefinition's name


@dataclass(frozen=True)
class Device:
    """One GPU as its DRA driver publishes it in a ResourceSlice."""

    name: str  # device name in the slice, e.g. gpu-0
    pool: str
    uuid: str = ""
    product_name: str = ""  # the driver's productName attribute (spaces, as NVML says)


@dataclass(frozen=True)
class Replica:
    """One replica to realize: the plan's assignment with the Model it belongs to."""

    name: str  # pod (and claim) name
    namespace: str
    model: str  # the Model's name
    model_uid: str
    node: str
    gpus: tuple[int, ...]
    hbm_per_gpu: int
    kv_tokens: int = 0
    spec_hash: str = ""  # of the Model spec the replica is made for (``spec_hash``)
    # HBM per GPU its worker sizes its KV pool from, when more than ``hbm_per_gpu`` (the
    # placement budget): whole GPUs in device-plugin mode. 0: the budget.
    pool_hbm_per_gpu: int = 0

    @property
    def tp(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class EndpointPicker:
    """The endpoint picker (EPP) every InferencePool names, from the operator's settings.

    kvpilot ships no EPP: a gateway asks the one a pool names which worker takes each
    request. ``name`` is its Service, ``{model}`` standing for the Model's name; the
    default follows the extension's own convention (``<pool>-epp``, gRPC on 9002). An
    empty name leaves the reference out, which the CRDs allow from release v1.5 on (the
    gateway then picks by itself, where it can). ``failure_mode``: what the gateway does
    when the picker does not answer (``FailClose`` refuses the request, ``FailOpen``
    sends it to an endpoint of its own choosing).
    """

    name: str = "{model}-epp"
    port: int = 9002
    failure_mode: str = "FailClose"


@dataclass(frozen=True)
class WeightsCache:
    """Where hf:// checkpoints are fetched to (the operator's settings).

    ``host_path``: a directory on each node that every replica there shares (one
    download per node and revision); empty: an emptyDir per pod (a download per
    replica start). ``hub_endpoint``: another hub or a mirror (``HF_ENDPOINT``).
    """

    host_path: str = "/var/cache/kvpilot/models"
    hub_endpoint: str = ""
    fetch_command: tuple[str, ...] = ("python", "-m", "kvpilot.worker.fetch")


@dataclass(frozen=True)
class WeightsMount:
    """What a pod needs to reach its weights: the checkpoint directory the worker opens,
    the volume holding it, and the init containers that fill it."""

    model_path: str
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]  # the worker container's (always read-only)
    init_containers: list[dict[str, Any]]


_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
             "runAsNonRoot": True}


def weights_for(spec: ModelSpec, image: str, cache: WeightsCache) -> WeightsMount | None:
    """How a worker pod gets the Model's ``source`` (None: the Model names none).

    Everything the worker reads is mounted read-only. hf:// is fetched by an init
    container of the worker image into the weights cache, under
    ``hf/ORG/NAME/REVISION``; it alone mounts the cache writable. A hostPath cache
    directory that the node creates belongs to root, so the fetch runs as UID 0 there,
    with every capability dropped (it can write where the owner may, nothing more);
    with an emptyDir (writable by all) it runs as the worker's non-root user.
    """
    if spec.source is None:
        return None
    src = parse_source(spec.source)
    read_only = [{"name": WEIGHTS_VOLUME, "mountPath": WEIGHTS_MOUNT, "readOnly": True}]
    if src.scheme == "file":
        return WeightsMount(src.location, [], [], [])
    if src.scheme == "host":
        volume = {"hostPath": {"path": src.location, "type": "Directory"}}
        return WeightsMount(WEIGHTS_MOUNT, [{"name": WEIGHTS_VOLUME, **volume}], read_only, [])
    if src.scheme == "pvc":
        volume = {"persistentVolumeClaim": {"claimName": src.location, "readOnly": True}}
        path = f"{WEIGHTS_MOUNT}/{src.subpath}" if src.subpath else WEIGHTS_MOUNT
        return WeightsMount(path, [{"name": WEIGHTS_VOLUME, **volume}], read_only, [])
    if src.scheme == "oci":
        volume = {"image": {"reference": src.location, "pullPolicy": "IfNotPresent"}}
        return WeightsMount(WEIGHTS_MOUNT, [{"name": WEIGHTS_VOLUME, **volume}], read_only, [])
    path = f"{WEIGHTS_MOUNT}/{hf_cache_path(src)}"
    if cache.host_path:
        volume: dict[str, Any] = {"hostPath": {"path": cache.host_path,
                                               "type": "DirectoryOrCreate"}}
        security = {**_SECURITY, "runAsNonRoot": False, "runAsUser": 0}
    else:
        volume, security = {"emptyDir": {}}, dict(_SECURITY)
    env: list[dict[str, Any]] = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                                 {"name": "HF_HOME", "value": "/tmp/huggingface"}]
    if cache.hub_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": cache.hub_endpoint})
    if spec.source_secret:
        env.append({"name": HUB_TOKEN_KEY, "valueFrom": {"secretKeyRef": {
            "name": spec.source_secret, "key": HUB_TOKEN_KEY}}})
    fetch = {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": list(cache.fetch_command),
        "args": [str(src), "--dest", path],
        "env": env,
        "volumeMounts": [{"name": WEIGHTS_VOLUME, "mountPath": WEIGHTS_MOUNT}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security,
    }
    return WeightsMount(path, [{"name": WEIGHTS_VOLUME, **volume}], read_only, [fetch])


def selector_labels(model: str) -> dict[str, str]:
    """Labels that select a Model's worker pods (``status.selector``)."""
    return {MANAGED_BY: MANAGER, LABEL_MODEL: model}


def selector_string(model: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(model).items()))


def owner_reference(model: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": model, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def endpoint(model: str, namespace: str) -> str:
    """The OpenAI base URL of a Model's Service, inside the cluster."""
    return f"http://{model}.{namespace}.svc/v1"


def serving_labels(model: str) -> dict[str, str]:
    """Labels of a Model's worker pods that take requests (not draining): what its
    Service and its InferencePool select."""
    return {**selector_labels(model), LABEL_COMPONENT: COMPONENT_WORKER, LABEL_SERVING: "true"}


def service_for(model: str, namespace: str, uid: str) -> dict[str, Any]:
    """The Model's Service: port 80 to the workers' ``http`` port, selecting its worker
    pods that take requests (ready and not draining), owned by the Model."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": model, "namespace": namespace, "labels": selector_labels(model),
                     "ownerReferences": [owner_reference(model, uid)]},
        "spec": {
            "type": "ClusterIP",
            "selector": serving_labels(model),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }


def inference_pool_for(model: str, namespace: str, uid: str, worker_port: int,
                       picker: EndpointPicker = EndpointPicker()) -> dict[str, Any]:
    """The Model's InferencePool (``inference.networking.k8s.io/v1``): the same serving
    workers as its Service, on the workers' own port (a gateway sends to pod IPs), and
    the endpoint picker the settings name; owned by the Model, so it goes with it."""
    spec: dict[str, Any] = {"selector": {"matchLabels": serving_labels(model)},
                            "targetPorts": [{"number": worker_port}]}
    if picker.name:
        spec["endpointPickerRef"] = {"name": picker.name.replace("{model}", model),
                                     "port": {"number": picker.port},
                                     "failureMode": picker.failure_mode}
    return {
        "apiVersion": f"{POOL_GROUP}/{POOL_VERSION}",
        "kind": POOL_KIND,
        "metadata": {"name": model, "namespace": namespace, "labels": selector_labels(model),
                     "ownerReferences": [owner_reference(model, uid)]},
        "spec": spec,
    }


def _covers(stored: Any, wanted: Any) -> bool:
    """Whether ``stored`` holds every field of ``wanted`` with its value (it may have
    more: defaults the API server filled in)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(_covers(stored.get(k), v)
                                                for k, v in wanted.items())
    return stored == wanted


def inference_pool_patch(wanted: Mapping[str, Any],
                         stored: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch that makes a stored InferencePool's spec the one
    :func:`inference_pool_for` built; None when it is that already.

    The selector's labels and the target ports must be exactly kvpilot's (a label added
    by hand would shrink the pool); of the picker reference, the fields kvpilot sets
    (the API server fills in ``group`` and ``kind``). ``appProtocol`` is left alone.
    """
    want, have = wanted["spec"], stored.get("spec") or {}
    patch: dict[str, Any] = {}
    labels = want["selector"]["matchLabels"]
    stored_labels = (have.get("selector") or {}).get("matchLabels") or {}
    if stored_labels != labels:
        patch["selector"] = {"matchLabels": {**{k: None for k in stored_labels
                                                if k not in labels}, **labels}}
    if have.get("targetPorts") != want["targetPorts"]:
        patch["targetPorts"] = want["targetPorts"]
    ref = want.get("endpointPickerRef")
    if ref is None and have.get("endpointPickerRef") is not None:
        patch["endpointPickerRef"] = None
    elif ref is not None and not _covers(have.get("endpointPickerRef"), ref):
        patch["endpointPickerRef"] = ref
    return {"spec": patch} if patch else None


def spec_hash(spec_json: Mapping[str, Any]) -> str:
    """A stable hash of what a replica's pod is built from."""
    import hashlib

    body = {k: v for k, v in spec_json.items() if k not in SCALING_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metadata(r: Replica) -> dict[str, Any]:
    return {
        "name": r.name,
        "namespace": r.namespace,
        "labels": {**selector_labels(r.model), LABEL_COMPONENT: COMPONENT_WORKER,
                   LABEL_REPLICA: r.name},
        "annotations": {
            ANN_NODE: r.node,
            ANN_GPUS: ",".join(str(g) for g in r.gpus),
            ANN_HBM: str(r.hbm_per_gpu),
            ANN_TP: str(r.tp),
            ANN_KV_TOKENS: str(r.kv_tokens),
            **({ANN_SPEC_HASH: r.spec_hash} if r.spec_hash else {}),
        },
        "ownerReferences": [owner_reference(r.model, r.model_uid)],
    }


def claim_for(r: Replica, devices: Sequence[Device], device_class: str,
              driver: str) -> dict[str, Any]:
    """A ResourceClaim for ``tp`` GPUs, each giving ``hbm_per_gpu`` of its memory.

    The selector names the planned GPUs by UUID (and product), so the kube-scheduler
    allocates exactly them or nothing; the capacity request makes it check the memory
    sums of every claim sharing a GPU, so no replica can overcommit one.
    """
    if len(devices) != r.tp:
        raise ValueError(f"{r.name}: {r.tp} GPUs planned, {len(devices)} devices given")
    uuids = ", ".join(json.dumps(d.uuid) for d in devices)
    products = sorted({d.product_name for d in devices if d.product_name})
    attrs = f"device.attributes[{json.dumps(driver)}]"
    selectors = [{"cel": {"expression": f"{attrs}.uuid in [{uuids}]"}}]
    if products:
        selectors.insert(0, {"cel": {"expression": f"{attrs}.productName == "
                                                   f"{json.dumps(products[0])}"}})
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": _metadata(r),
        "spec": {"devices": {"requests": [{
            "name": CLAIM_REQUEST,
            "exactly": {
                "deviceClassName": device_class,
                "allocationMode": "ExactCount",
                "count": r.tp,
                "selectors": selectors,
                "capacity": {"requests": {"memory": str(r.hbm_per_gpu)}},
            },
        }]}},
    }


def _resources(spec: ModelSpec, gpus: int) -> dict[str, Any]:
    requests = {k: v for k, v in spec.worker.resources.requests.items()}
    limits = {k: v for k, v in spec.worker.resources.limits.items()}
    if gpus:
        requests[RESOURCE_GPU] = limits[RESOURCE_GPU] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_for(r: Replica, spec: ModelSpec, spec_json: Mapping[str, Any], *, mode: str,
            worker_port: int, command: Sequence[str], default_image: str | None = None,
            drain_seconds: float = 120, cache: WeightsCache = WeightsCache()) -> dict[str, Any]:
    """The worker pod of one replica, pinned to its planned node.

    ``mode`` is ``dra`` (the pod uses the replica's claim of the same name) or
    ``devicePlugin`` (whole ``nvidia.com/gpu`` units and required node affinity). The
    worker gets its Model as env vars (``kvpilot.api.contract``) and sizes its KV pool
    from them; its weights come from the Model's ``source`` (:func:`weights_for`).
    """
    image = spec.worker.image
    if default_image and image == DEFAULT_WORKER_IMAGE:
        image = default_image
    weights = weights_for(spec, image, cache)
    args = ["--host", "$(POD_IP)", "--port", str(worker_port)]
    if weights is not None:
        args += ["--model", weights.model_path]
    args += list(spec.worker.engine_args)
    resources = _resources(spec, r.tp if mode == "devicePlugin" else 0)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        "command": list(command),
        "args": args,
        "ports": [{"name": "http", "containerPort": worker_port, "protocol": "TCP"}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": contract.ENV_MODEL_NAME, "value": r.model},
            {"name": contract.ENV_MODEL_SPEC,
             "value": json.dumps(spec_json, sort_keys=True, separators=(",", ":"))},
            {"name": contract.ENV_HBM_PER_GPU,
             "value": str(r.pool_hbm_per_gpu or r.hbm_per_gpu)},
            {"name": contract.ENV_TENSOR_PARALLEL, "value": str(r.tp)},
        ],
        "readinessProbe": {"httpGet": {"path": contract.PATH_READY, "port": "http"},
                           "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": contract.PATH_HEALTH, "port": "http"},
                          "periodSeconds": 10, "failureThreshold": 6},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(_SECURITY),
    }
    if resources:
        container["resources"] = resources
    mounts = list(weights.mounts) if weights is not None else []
    volumes = list(weights.volumes) if weights is not None else []
    if r.tp > 1:  # NCCL between a replica's ranks goes through shared memory
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "nodeSelector": {HOSTNAME_LABEL: r.node},
        "tolerations": [{"key": RESOURCE_GPU, "operator": "Exists", "effect": "NoSchedule"}],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": int(drain_seconds) + 30,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # a worker never calls the API server
    }
    if volumes:
        pod_spec["volumes"] = volumes
    if weights is not None and weights.init_containers:
        pod_spec["initContainers"] = weights.init_containers
    if mode == "dra":
        pod_spec["resourceClaims"] = [{"name": CLAIM_REQUEST, "resourceClaimName": r.name}]
        container["resources"] = {**container.get("resources", {}),
                                  "claims": [{"name": CLAIM_REQUEST}]}
    else:
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": HOSTNAME_LABEL, "operator": "In", "values": [r.node]}]}]}}}
    meta = _metadata(r)
    meta["labels"][LABEL_SERVING] = "true"
    meta["annotations"][ANN_SPEC_HASH] = spec_hash(spec_json)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
              previous: Sequence[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """A status condition; its transition time moves only when its status changes."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    out = {"type": type_, "status": value, "reason": reason, "message": message[:32768],
           "lastTransitionTime": since or now}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def event_for(model: Mapping[str, Any], reason: str, message: str, now: str,
              warning: bool = False, component: str = "kvpilot-operator") -> dict[str, Any]:
    """A core/v1 Event about a Model (``kubectl describe model`` shows it)."""
    meta = model["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid", "")},
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": component},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": component,
        "reportingInstance": component,
    }
