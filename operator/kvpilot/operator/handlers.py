"""The kopf handlers: thin. They keep indexes, wake the fleet loop and guard deletion.

- ``@kopf.index`` keeps in-memory copies of GPU nodes, worker pods, the Models'
  Services, ResourceSlices, ResourceClaims and Models; the fleet loop's snapshot is built from them. Events wake
  the loop only when they change what placement reads (``view.signature``). Kopf calls
  no other handler before every indexed kind has been listed once, so the first Model
  handler to run opens the loop (it never plans from half a cluster).
- Model create/update/resume: check the stored spec (a bad one is reported, never
  crashes anything) and wake the loop. Delete: a finalizer holds the Model until the
  loop has removed its replicas.
- Startup: kopf's own configuration, the fleet loop and the scrape loop; cleanup stops
  them.
- InferencePools (:func:`serve_inference_pools`, unless the settings turn them off): an
  index of kvpilot's pools and one of the pool CRD, so the fleet loop knows, without a
  request per pass, whether the cluster serves them and what exists. Kopf starts
  watching the pools when their CRD appears and stops when it goes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from pydantic import ValidationError

from kvpilot.api.files import one_line
from kvpilot.api.model import GROUP, PLURAL, VERSION, ModelSpec
from kvpilot.operator.objects import (
    LABEL_MODEL, MANAGED_BY, MANAGER, POOL_CRD, POOL_GROUP, POOL_VERSION,
)
from kvpilot.operator.runner import Fleet, Indexes
from kvpilot.operator.scaling import Scaler
from kvpilot.operator.view import signature, trimmed

log = logging.getLogger("kvpilot.operator")
FINALIZER = "kvpilot.dev/finalizer"
MODELS = (GROUP, VERSION, PLURAL)
RESOURCE = ("resource.k8s.io", "v1")
WORKERS = {MANAGED_BY: MANAGER}
POOLS = (POOL_GROUP, POOL_VERSION, "inferencepools")
CRDS = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")


def _raw(body: kopf.Body) -> dict[str, Any]:
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status")
            if k in body}


def _key(body: kopf.Body) -> tuple[str | None, str]:
    return body.metadata.namespace, body.metadata.name


def _wake(memo: kopf.Memo) -> None:
    fleet: Fleet | None = getattr(memo, "fleet", None)
    if fleet is not None:
        fleet.wake()


# -- indexes ----------------------------------------------------------------------------
# Each returns {key: object}; a DELETED event removes the object from the index.

@kopf.index("nodes")
def gpu_nodes(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("Node", _raw(body))}


@kopf.index("pods", labels=WORKERS)
def worker_pods(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("Pod", _raw(body))}


@kopf.index("services", labels=WORKERS)
def model_services(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("Service", _raw(body))}


@kopf.index(*RESOURCE, "resourceslices")
def resource_slices(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): _raw(body)}


@kopf.index(*RESOURCE, "resourceclaims")
def resource_claims(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("ResourceClaim", _raw(body))}


@kopf.index(*MODELS)
def models(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): _raw(body)}


# -- waking the fleet loop --------------------------------------------------------------
# Only a change placement could act on wakes it: a node's heartbeat rewrites its status
# every few seconds, and a pass per heartbeat of a thousand nodes would never stop.

_seen: dict[tuple[str, Any], tuple] = {}


def _changed(kind: str, event: str, body: kopf.Body, memo: kopf.Memo) -> None:
    key = (kind, _key(body))
    if event == "DELETED":
        _seen.pop(key, None)
        _wake(memo)
        return
    sig = signature(kind, _raw(body))
    if _seen.get(key) != sig:
        _seen[key] = sig
        _wake(memo)


@kopf.on.event("nodes")
def node_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("Node", type, body, memo)


@kopf.on.event("pods", labels=WORKERS)
def pod_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("Pod", type, body, memo)


@kopf.on.event("services", labels=WORKERS)
def service_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("Service", type, body, memo)


@kopf.on.event(*RESOURCE, "resourceslices")
def slice_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("ResourceSlice", type, body, memo)


@kopf.on.event(*RESOURCE, "resourceclaims")
def claim_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("ResourceClaim", type, body, memo)


@kopf.on.event(*MODELS)
def model_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("Model", type, body, memo)


# -- InferencePools: registered by serve_inference_pools, or not at all -----------------

def inference_pools(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("InferencePool", _raw(body))}


def inference_pool_crds(body: kopf.Body, **_: Any) -> dict:
    return {_key(body): trimmed("CustomResourceDefinition", _raw(body))}


def pool_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("InferencePool", type, body, memo)


def pool_crd_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _changed("CustomResourceDefinition", type, body, memo)


def _is_pool_crd(name: str, **_: Any) -> bool:
    return name == POOL_CRD


class _PoolsUnserved(logging.Filter):
    """Drops kopf's warning that InferencePools cannot be served while their CRD is
    missing (it repeats it whenever any CRD in the cluster changes): for kvpilot that is
    a state, which the fleet loop logs once, not a problem. Kopf's warning about any
    other resource passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unresolved resources")
                    and message.count("Selector(") == 1 and f"'{POOL_GROUP}'" in message)


_serving_pools = False


def serve_inference_pools() -> None:
    """Register the InferencePool indexes and their wake-ups (before kopf starts).

    Not decorators, because settings decide: with InferencePools off, kopf must not
    watch them (the chart then grants nothing on them). Kopf watches every CRD anyway
    (to follow resources that come and go), so knowing whether the pool CRD is there
    costs no request of its own.
    """
    global _serving_pools
    if _serving_pools:
        return
    kopf.index(*POOLS, labels=WORKERS)(inference_pools)
    kopf.on.event(*POOLS, labels=WORKERS)(pool_event)
    kopf.index(*CRDS, when=_is_pool_crd)(inference_pool_crds)
    kopf.on.event(*CRDS, when=_is_pool_crd)(pool_crd_event)
    logging.getLogger("kopf._core.reactor.observation").addFilter(_PoolsUnserved())
    _serving_pools = True


# -- lifecycle --------------------------------------------------------------------------

@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    _seen.clear()  # kopf lists everything afresh (also after the Lease was lost and retaken)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvpilot.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvpilot.dev", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's own events: problems only
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    indexes = Indexes(models=kwargs["models"], nodes=kwargs["gpu_nodes"],
                      pods=kwargs["worker_pods"], claims=kwargs["resource_claims"],
                      slices=kwargs["resource_slices"], services=kwargs["model_services"],
                      pools=kwargs.get("inference_pools", {}),
                      crds=kwargs.get("inference_pool_crds", {}))
    health = memo.get("health")

    def passed(_) -> None:
        if health is not None:
            health.passed()

    fleet = Fleet(memo.kube, memo.settings, indexes, on_pass=passed)
    scaler = Scaler(memo.kube, memo.settings, indexes, fleet.ready, fleet.wake)
    memo.fleet, memo.scaler = fleet, scaler
    memo.tasks = [asyncio.create_task(fleet.run(), name="kvpilot fleet loop"),
                  asyncio.create_task(scaler.run(), name="kvpilot scrape loop")]


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Kopf connects with the same credentials as the operator's own client."""
    creds = memo.kube.creds
    c = creds.configuration
    token = creds.headers().get("Authorization", "")
    return kopf.ConnectionInfo(
        server=creds.server, ca_path=c.ssl_ca_cert, insecure=not c.verify_ssl,
        certificate_path=c.cert_file, private_key_path=c.key_file,
        scheme="Bearer" if token else None, token=token.split(" ", 1)[-1] if token else None)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    tasks = memo.get("tasks") or []
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for loop in (memo.get("fleet"), memo.get("scaler")):
        if loop is not None:
            await loop.close()


def _check_spec(spec: Any) -> None:
    """A stored spec pydantic refuses is reported once, as a permanent handler error."""
    try:
        ModelSpec.model_validate(dict(spec))
    except ValidationError as err:
        raise kopf.PermanentError(f"spec is invalid: {one_line(err)}") from err


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS, field="spec")
def model_changed(spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    fleet: Fleet = memo.fleet
    fleet.ready.set()  # kopf ran a handler: every index has been listed
    fleet.wake()
    _check_spec(spec)


# How long a deletion waits in its handler for the replicas to go before kopf retries it
# (a retry is logged as an error; a normal deletion takes a pass or two).
DELETE_WAIT_SECONDS = 30.0


@kopf.on.delete(*MODELS)
async def model_deleted(name: str, namespace: str, memo: kopf.Memo, worker_pods: kopf.Index,
                        resource_claims: kopf.Index, **_: Any) -> None:
    """Hold the finalizer until the fleet loop has removed every replica."""
    fleet: Fleet = memo.fleet
    fleet.ready.set()
    fleet.wake()

    def left() -> list[str]:
        return sorted({o["metadata"]["name"] for index in (worker_pods, resource_claims)
                       for store in list(index.values()) for o in list(store)
                       if o["metadata"].get("namespace") == namespace
                       and (o["metadata"].get("labels") or {}).get(LABEL_MODEL) == name})

    deadline = asyncio.get_running_loop().time() + DELETE_WAIT_SECONDS
    while (remaining := left()) and asyncio.get_running_loop().time() < deadline:
        # The indexes follow the watch (no API call here); once a second, as kopf's own
        # retries were, since a scan reads every worker object.
        await asyncio.sleep(1.0)
    if remaining:
        raise kopf.TemporaryError(f"waiting for {len(remaining)} worker object(s) to go: "
                                  f"{', '.join(remaining[:5])}", delay=1)
