"""The mission in one scenario, with real worker processes: `helm install`, a Model, load
until its KV pressure passes the target, a scale-up that new workers absorb, then the
load gone and a scale-down that drains. Every request ends complete or with an explicit
429/503: none lost, none truncated.

Workers are the real engine (``python -m kvpilot.worker``, CPU, a tiny random Llama
checkpoint) started on each KWOK pod's loopback IP with the environment the operator put
in the pod; the load reaches them through the Model's Service (its EndpointSlices). The
operator runs out of cluster with the token of the chart's ServiceAccount and the
settings of the chart's Deployment.
"""

from __future__ import annotations

import time

import pytest

from e2e.chart import NAMESPACE, RELEASE, kube_helm
from e2e.fleet import fleet_cluster
from e2e.load import Load, LoadThread
from e2e.operator import chart_operator, wait_for
from e2e.fleet import FLEET
from e2e.state import events, model_status
from e2e.workers import Workers, endpoints, tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("e2e-cluster"), FLEET, dra=True,
                       real_workers=True) as c:
        yield c


def test_kv_pressure_scales_real_workers_up_and_a_drained_scale_down_loses_nothing(
        cluster, tmp_path):
    op = chart_operator(cluster, tmp_path, "e2e")
    workers = Workers(cluster, tmp_path / "workers")
    # Clients reach the Model through its Service: the ready endpoints the
    # kube-controller-manager keeps in its EndpointSlices.
    load = Load(lambda: endpoints(cluster, "tiny"), "tiny", prompt_tokens=300, max_tokens=48)
    driver = LoadThread(load)
    op.start()
    workers.start()
    logs = lambda: op.log()[-4000:] + "\n" + workers.tails(1500)  # noqa: E731
    try:
        cluster.apply([tiny_model("tiny", tiny_checkpoint(tmp_path / "tiny"))])
        wait_for("the first worker ready", lambda: workers.ready("tiny"), 120, log=logs)
        driver.start()
        for clients in (2, 4, 8):  # the ramp
            load.clients = clients
            time.sleep(4)
        wait_for("a scale-up", lambda: any(e["reason"] == "ScaledUp"
                                           for e in events(cluster, "tiny")), 120, log=logs)
        wait_for("a second worker serving", lambda: len(workers.ready("tiny")) >= 2, 120,
                 log=logs)
        wait_for("two workers answering", lambda: len(load.served) >= 2, 120, log=logs)

        load.clients = 0  # the load goes
        wait_for("a scale-down", lambda: any(e["reason"] == "ScaledDown"
                                             for e in events(cluster, "tiny")), 120, log=logs)
        wait_for("back to one replica", lambda: model_status(cluster, "tiny").get(
            "replicas") == 1 and len(workers.processes) == 1, 150, log=logs)
    finally:
        driver.finish()
        workers.stop()
        op.stop()

    reasons = [e["reason"] for e in events(cluster, "tiny")]
    assert "Draining" in reasons
    removed = [e["message"] for e in events(cluster, "tiny") if e["reason"] == "ReplicaRemoved"]
    assert removed and all("drained" in m for m in removed), removed
    assert "DrainTimeout" not in reasons
    counts = dict(load.counts)
    print(f"requests: {counts}; worker processes started: {workers.started}")
    assert counts.get("complete", 0) > 0
    assert counts.get("truncated", 0) == 0 and counts.get("failed", 0) == 0, (
        counts, load.errors[:10])
    assert workers.started >= 2 and len(load.served) >= 2  # new workers took load
    kube_helm(cluster, tmp_path / "helm", "uninstall", RELEASE, "-n", NAMESPACE)
