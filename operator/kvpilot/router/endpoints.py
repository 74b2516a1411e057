"""Where each Model's requests may go, from the EndpointSlices of the Models' Services.

Every Model has a Service of its name (``kvpilot.operator.objects.service_for``)
selecting its worker pods that are not draining; the kube-controller-manager writes its
EndpointSlices with the Service's labels plus ``kubernetes.io/service-name``, and marks
each endpoint ``ready`` from the pod's readiness. So a Model's routable replicas are the
ready, non-terminating endpoints of the slices labelled with its name: the same set a
ClusterIP would balance over, kept by Kubernetes, not by the router.

``routes_from`` is pure: slices in, ``Routes`` out. A Model name served in two
namespaces is a conflict (a request names only the model); the router refuses it
rather than mixing two Models' replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from kvpilot.operator.objects import LABEL_MODEL, MANAGED_BY, MANAGER

SERVICE_NAME = "kubernetes.io/service-name"
# What the router lists and watches: the slices of kvpilot's Model Services.
SLICE_SELECTOR = f"{MANAGED_BY}={MANAGER},{LABEL_MODEL}"
PORT_NAME = "http"


@dataclass(frozen=True)
class Endpoint:
    name: str  # "ip:port" ("[ip6]:port"): the replica's identity in scores and metrics
    url: str  # "http://ip:port"
    pod: str = ""


@dataclass(frozen=True)
class ModelRoute:
    name: str
    namespace: str
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Routes:
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    conflicts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> namespaces


def endpoint(ip: str, port: int, pod: str = "") -> Endpoint:
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(f"{host}:{port}", f"http://{host}:{port}", pod)


def _model_of(s: Mapping[str, Any]) -> str | None:
    labels = (s.get("metadata") or {}).get("labels") or {}
    name = labels.get(SERVICE_NAME)
    if not name or labels.get(MANAGED_BY) != MANAGER or labels.get(LABEL_MODEL) != name:
        return None
    return name


def _port(s: Mapping[str, Any]) -> int | None:
    ports = s.get("ports") or []
    named = [p for p in ports if p.get("name") == PORT_NAME]
    chosen = named or (ports if len(ports) == 1 else [])
    port = chosen[0].get("port") if chosen else None
    return port if isinstance(port, int) else None


def _routable(e: Mapping[str, Any]) -> bool:
    c = e.get("conditions") or {}
    # The API: a nil ready means ready; a terminating endpoint takes nothing new.
    return c.get("ready") is not False and not c.get("terminating")


def routes_from(slices: Iterable[Mapping[str, Any]]) -> Routes:
    """Model name -> its routable endpoints (sorted, each once), from EndpointSlices."""
    found: dict[tuple[str, str], dict[str, Endpoint]] = {}
    for s in slices:
        model = _model_of(s)
        if model is None:
            continue
        namespace = (s.get("metadata") or {}).get("namespace", "")
        eps = found.setdefault((namespace, model), {})
        port = _port(s)
        if port is None or s.get("addressType") not in ("IPv4", "IPv6"):
            continue
        for e in s.get("endpoints") or []:
            if not _routable(e) or not e.get("addresses"):
                continue
            pod = (e.get("targetRef") or {}).get("name", "")
            ep = endpoint(e["addresses"][0], port, pod)
            eps[ep.name] = ep
    namespaces: dict[str, list[str]] = {}
    for namespace, model in found:
        namespaces.setdefault(model, []).append(namespace)
    models, conflicts = {}, {}
    for model, spaces in namespaces.items():
        if len(spaces) > 1:
            conflicts[model] = tuple(sorted(spaces))
            continue
        eps = found[(spaces[0], model)]
        models[model] = ModelRoute(model, spaces[0],
                                   tuple(eps[k] for k in sorted(eps)))
    return Routes(dict(sorted(models.items())), conflicts)


def static_routes(upstreams: Mapping[str, Iterable[str]]) -> Routes:
    """Routes given by hand (``--upstream MODEL=URL``): no cluster, e.g. a benchmark."""
    models = {}
    for model, urls in upstreams.items():
        eps = []
        for url in urls:
            url = url.rstrip("/")
            eps.append(Endpoint(url.split("://", 1)[-1], url))
        models[model] = ModelRoute(model, "", tuple(sorted(set(eps), key=lambda e: e.name)))
    return Routes(dict(sorted(models.items())))
