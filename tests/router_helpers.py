"""Shared by the router tests: an event loop on a thread, a uvicorn server on it, and
EndpointSlices as the kube-controller-manager writes them."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from kvpilot.operator.objects import service_for
from kvpilot.router.server import ServerBounds, uvicorn_config


class Loop:
    """An event loop on a thread: the servers live there, the test calls in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args) -> Any:
        done: Future = Future()

        def go():
            try:
                done.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                done.set_exception(err)

        self.loop.call_soon_threadsafe(go)
        return done.result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(app, bounds: ServerBounds | None = None, host: str = "127.0.0.1"):
    import uvicorn

    if bounds is None:
        config = uvicorn.Config(app, host=host, port=0, lifespan="off", log_level="critical",
                                access_log=False)
    else:
        config = uvicorn_config(app, host=host, port=0, bounds=bounds, log_level="critical")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


def slice_of(model: str, endpoints: list[dict], *, namespace: str = "default",
             name: str = "", ports=None, address_type: str = "IPv4") -> dict:
    """An EndpointSlice as the kube-controller-manager writes it for a Model's Service."""
    service = service_for(model, namespace, "uid")
    labels = {**service["metadata"]["labels"], "kubernetes.io/service-name": model,
              "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    return {"metadata": {"name": name or f"{model}-abcde", "namespace": namespace,
                         "labels": labels},
            "addressType": address_type,
            "ports": ports if ports is not None else [{"name": "http", "port": 8000,
                                                       "protocol": "TCP"}],
            "endpoints": endpoints}


def ep(ip: str, pod: str, ready=True, terminating=False) -> dict:
    conditions = {"serving": ready, "terminating": terminating}
    if ready is not None:
        conditions["ready"] = ready
    return {"addresses": [ip], "conditions": conditions,
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}}
