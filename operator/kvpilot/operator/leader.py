"""Leader election on a coordination.k8s.io Lease: one operator replica acts at a time.

The replica holding the Lease runs the handlers and the fleet loop; the others wait to
acquire it. A holder that cannot renew within the lease duration stops acting, as
controller-runtime's leader election does, and stands by to acquire it again (in the
same process: an API server restart must not become a crash loop). Kopf's own peering
is not used for this: it freezes every operator of equal priority, and it does not
pause tasks the operator runs itself, such as the fleet loop.

The decision (may I take the Lease?) is the pure :func:`may_acquire`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from kvpilot.operator.kube import ApiError, Kube, path_of

log = logging.getLogger("kvpilot.leader")


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str) -> datetime:
    return datetime.strptime(ts.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


def may_acquire(spec: Mapping[str, Any], identity: str, now: datetime) -> bool:
    """True when the Lease is ours, unheld, or its holder let it expire."""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = spec.get("renewTime") or spec.get("acquireTime")
    if not renewed:
        return True
    return now > _parse(renewed) + timedelta(seconds=spec.get("leaseDurationSeconds") or 15)


class Lease:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 seconds: float) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity, self.seconds = identity, seconds

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True when this replica holds it."""
        path = path_of("Lease", self.namespace, self.name)
        now = now_micro()
        current = await self.kube.get(path)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.seconds),
                "renewTime": now}
        if current is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**spec, "acquireTime": now, "leaseTransitions": 0}}
            return await self.kube.create(body) is not None
        old = current.get("spec") or {}
        if not may_acquire(old, self.identity, datetime.now(timezone.utc)):
            return False
        if old.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (old.get("leaseTransitions") or 0) + 1
        current["spec"] = {**old, **spec}
        try:
            await self.kube.replace(current)  # resourceVersion guards against a racing peer
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        waiting_logged = False
        while True:
            try:
                if await self.try_acquire():
                    log.info("acquired lease %s/%s as %s", self.namespace, self.name,
                             self.identity)
                    return
            except (ApiError, OSError) as err:
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            if not waiting_logged:
                log.info("another replica holds lease %s/%s; standing by", self.namespace,
                         self.name)
                waiting_logged = True
            await asyncio.sleep(self.seconds / 3)

    async def keep(self, lost: asyncio.Event) -> None:
        """Renew until renewal fails for a whole lease duration, then set ``lost``."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while not lost.is_set():
            await asyncio.sleep(self.seconds / 3)
            try:
                if await self.try_acquire():
                    last_ok = loop.time()
                    continue
                log.error("lease %s/%s taken by another replica", self.namespace, self.name)
                lost.set()
            except (ApiError, OSError) as err:
                log.warning("lease renewal failed: %s", err)
                if loop.time() - last_ok > self.seconds:
                    log.error("could not renew lease for %.0fs; stepping down", self.seconds)
                    lost.set()

    async def release(self) -> None:
        """Give the Lease up on a clean exit, so a standby takes over at once."""
        path = path_of("Lease", self.namespace, self.name)
        try:
            current = await self.kube.get(path)
            if current and (current.get("spec") or {}).get("holderIdentity") == self.identity:
                current["spec"]["holderIdentity"] = None
                await self.kube.replace(current)
        except (ApiError, OSError) as err:
            log.warning("could not release lease: %s", err)

