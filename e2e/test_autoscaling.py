"""Autoscaling on KV pressure on the real control plane, with stand-in workers whose
metrics the test sets: scale-up after the window, drain before scale-down, a worker that
never drains, and who owns ``spec.replicas`` with autoscaling on and off."""

from __future__ import annotations

import json
import time

import pytest

from e2e.operator import OperatorProcess, wait_for
from e2e.fleet import SMALL, autoscaled, model
from e2e.state import events, live, model_status

SCRAPE = 1.0
DRAIN_TIMEOUT = 10


@pytest.fixture(scope="module")
def operator(dra_cluster, tmp_path_factory):
    op = OperatorProcess(dra_cluster, tmp_path_factory.mktemp("op") / "operator.log",
                         scrape_seconds=SCRAPE, drain_timeout_seconds=DRAIN_TIMEOUT)
    op.start()
    yield op
    op.stop()


def spec_replicas(cluster, name: str) -> int:
    return cluster.get("model", name)["spec"]["replicas"]


def reasons(cluster, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, name)]


def test_pressure_above_target_adds_a_pod_and_its_fall_drains_one(dra_cluster, operator,  # noqa: F811
                                                                 fakes):
    fakes.set("grow", pressure=0.5)
    dra_cluster.apply([autoscaled("grow")])
    wait_for("first worker", lambda: "grow-0" in fakes.workers, 60, log=operator.log)
    wait_for("kv pressure in status", lambda: model_status(dra_cluster, "grow").get(
        "kvPressurePercent") == 50, 30, log=operator.log)

    high_since = time.monotonic()
    fakes.set("grow", pressure=0.95)
    wait_for("a second pod", lambda: len(live(dra_cluster, "grow")) >= 2, 60, log=operator.log)
    seconds = time.monotonic() - high_since
    up = next(e for e in events(dra_cluster, "grow") if e["reason"] == "ScaledUp")
    assert up["message"].startswith("1 -> 2 replicas: kv pressure 95% > target 75% for ")
    print(f"pressure above target -> new pod: {seconds:.1f}s (window 2s, scrape {SCRAPE}s)")
    fakes.set("grow", pressure=0.5)  # 2 replicas at 50%: hold
    wait_for("two workers", lambda: {"grow-0", "grow-1"} <= set(fakes.workers), 60,
             log=operator.log)

    fakes.set("grow", pressure=0.1, drains=False)
    victim = wait_for("a drain request", lambda: next(
        (w.pod for w in fakes.workers.values() if w.model == "grow" and w.drain_asked), None),
        60, log=operator.log)
    assert spec_replicas(dra_cluster, "grow") == 1
    time.sleep(3)  # the worker still serves: its pod must stay
    assert victim in live(dra_cluster, "grow")
    assert "Draining" in reasons(dra_cluster, "grow")
    fakes.set("grow", drains=True)
    wait_for("the drained pod gone", lambda: victim not in live(dra_cluster, "grow"), 30,
             log=operator.log)
    assert any(e["reason"] == "ReplicaRemoved" and "drained" in e["message"]
               for e in events(dra_cluster, "grow"))
    assert len(live(dra_cluster, "grow")) == 1


def test_a_worker_that_never_drains_is_removed_after_the_timeout(dra_cluster, operator,  # noqa: F811
                                                                fakes):
    fakes.set("stuck", pressure=0.5, drains=False)
    dra_cluster.apply([autoscaled("stuck", replicas=2)])
    wait_for("two workers", lambda: sum(w.model == "stuck" for w in fakes.workers.values())
             == 2, 60, log=operator.log)
    fakes.set("stuck", pressure=0.05)
    victim = wait_for("a drain request", lambda: next(
        (w.pod for w in fakes.workers.values() if w.model == "stuck" and w.drain_asked), None),
        60, log=operator.log)
    asked = fakes.workers[victim].drain_asked
    wait_for("the stuck pod gone", lambda: victim not in live(dra_cluster, "stuck"),
             DRAIN_TIMEOUT + 30, log=operator.log)
    assert time.monotonic() - asked >= DRAIN_TIMEOUT - 1  # not before the timeout
    timeout = [e for e in events(dra_cluster, "stuck") if e["reason"] == "DrainTimeout"]
    assert timeout and timeout[0]["type"] == "Warning" and victim in timeout[0]["message"]


def test_with_autoscaling_off_kubectl_scale_is_honoured(dra_cluster, operator, fakes):  # noqa: F811
    fakes.set("manual", pressure=0.99, waiting=5)
    m = model("manual", 1, **SMALL)
    m["spec"]["maxReplicas"] = 3
    dra_cluster.apply([m])
    wait_for("one worker", lambda: "manual-0" in fakes.workers, 60, log=operator.log)
    dra_cluster.kubectl("scale", "model/manual", "--replicas=2")
    wait_for("two pods", lambda: len(live(dra_cluster, "manual")) == 2, 60, log=operator.log)
    time.sleep(4 * SCRAPE)  # pressure is far above any target: still nothing changes
    assert spec_replicas(dra_cluster, "manual") == 2
    assert not {"ScaledUp", "ScaledDown"} & set(reasons(dra_cluster, "manual"))
    scale = json.loads(dra_cluster.kubectl(
        "get", "--raw", "/apis/kvpilot.dev/v1alpha1/namespaces/default/models/manual/scale"
    ).stdout)
    assert scale["status"]["selector"] == ("app.kubernetes.io/managed-by=kvpilot,"
                                           "kvpilot.dev/model=manual")


def test_with_autoscaling_on_a_manual_scale_is_reported_and_overridden(dra_cluster, operator,  # noqa: F811
                                                                       fakes):
    fakes.set("owned", pressure=0.5)
    dra_cluster.apply([autoscaled("owned", down=1)])
    wait_for("one worker", lambda: "owned-0" in fakes.workers, 60, log=operator.log)
    time.sleep(2 * SCRAPE)
    dra_cluster.kubectl("scale", "model/owned", "--replicas=3")
    wait_for("the override reported", lambda: "ScaledOutsideAutoscaler" in reasons(
        dra_cluster, "owned"), 30, log=operator.log)
    wait_for("the autoscaler's count back", lambda: spec_replicas(dra_cluster, "owned") < 3,
             60, log=operator.log)
