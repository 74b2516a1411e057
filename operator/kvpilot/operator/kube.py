"""A small async Kubernetes client: the few REST calls the operator makes, over httpx.

Credentials come from the ``kubernetes`` package's loaders (in-cluster service account,
else kubeconfig), so the operator authenticates exactly as kubectl and kopf do. Every
call is a plain REST request on a path built from the object's kind; the operator's
writes are few and known, so a generic client adds nothing but weight.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import httpx

log = logging.getLogger("kvpilot.kube")
USER_AGENT = "kvpilot-operator"

# kind -> (API path prefix, plural); namespaced kinds only, plus Lease.
PATHS = {
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Service": ("/api/v1", "services"),
    "ResourceClaim": ("/apis/resource.k8s.io/v1", "resourceclaims"),
    "Model": ("/apis/kvpilot.dev/v1alpha1", "models"),
    "InferencePool": ("/apis/inference.networking.k8s.io/v1", "inferencepools"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path_of(kind: str, namespace: str, name: str = "", sub: str = "") -> str:
    prefix, plural = PATHS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


@dataclass
class Credentials:
    server: str
    ssl_context: ssl.SSLContext | bool
    configuration: Any  # kubernetes.client.Configuration: refreshes tokens

    def headers(self) -> dict[str, str]:
        c = self.configuration
        if getattr(c, "refresh_api_key_hook", None) is not None:
            c.refresh_api_key_hook(c)
        token = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix(
            "authorization")
        return {"Authorization": token} if token else {}


def load_credentials(kubeconfig: Optional[str] = None) -> Credentials:
    """In-cluster service account if present, else the kubeconfig (or $KUBECONFIG)."""
    from kubernetes import client, config  # only here: the rest of the module is pure I/O

    configuration = client.Configuration()
    try:
        if kubeconfig:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    if configuration.verify_ssl is False:
        context: ssl.SSLContext | bool = False
    else:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return Credentials(configuration.host.rstrip("/"), context, configuration)


class Kube:
    """The operator's API calls. ``writes`` counts every write request sent."""

    def __init__(self, creds: Credentials, concurrency: int = 16, timeout: float = 30) -> None:
        self.creds = creds
        self.client = httpx.AsyncClient(
            base_url=creds.server, verify=creds.ssl_context, timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency))
        self.gate = asyncio.Semaphore(concurrency)
        self.writes = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json") -> Optional[dict]:
        if method != "GET":
            self.writes += 1
        headers = self.creds.headers()
        if body is not None:
            headers["Content-Type"] = content_type
        async with self.gate:
            try:
                resp = await self.client.request(method, path, json=body, headers=headers)
            except httpx.TransportError as err:  # unreachable or too slow: retried later
                raise ApiError(0, f"{type(err).__name__}: {err}") from err
        if resp.status_code in (200, 201, 202):
            return resp.json() if resp.content else {}
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        raise ApiError(resp.status_code, message)

    async def get(self, path: str) -> Optional[dict]:
        try:
            return await self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def create(self, obj: Mapping[str, Any]) -> Optional[dict]:
        """Create ``obj``; None when an object of that name exists already (409)."""
        meta = obj["metadata"]
        try:
            return await self.request("POST", path_of(obj["kind"], meta["namespace"]), obj)
        except ApiError as err:
            if err.status == 409:
                log.info("%s %s/%s exists already (%s)", obj["kind"], meta["namespace"],
                         meta.get("name") or meta.get("generateName"), err)
                return None
            raise

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete; False when it was gone already (404)."""
        try:
            await self.request("DELETE", path_of(kind, namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1",
                                "propagationPolicy": "Background"})
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any],
                    sub: str = "") -> Optional[dict]:
        """JSON merge patch (on a subresource such as ``status`` or ``scale``)."""
        return await self.request("PATCH", path_of(kind, namespace, name, sub), patch,
                                  content_type="application/merge-patch+json")

    async def replace(self, obj: Mapping[str, Any]) -> dict:
        meta = obj["metadata"]
        return await self.request("PUT", path_of(obj["kind"], meta["namespace"], meta["name"]),
                                  obj)
