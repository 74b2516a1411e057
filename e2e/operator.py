"""Run the real operator (``kvpilot operator``) as a process against a local cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from e2e.cluster import Cluster, _die_with_parent

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "kvpilot-system"


def operator_writes(cluster: Cluster) -> list[dict]:
    """The operator's writes (its own client's and kopf's), except its Lease renewals
    (leader election, not reconcile); the audit log read once."""
    return [e for e in cluster.audit_writes(("kvpilot-operator", "kopf"))
            if e.get("objectRef", {}).get("resource") != "leases"]


def ensure_namespace(cluster: Cluster, name: str = NAMESPACE) -> None:
    cluster.kubectl("create", "namespace", name, check=False)


class OperatorProcess:
    """``kvpilot operator`` out of cluster, with its log kept in ``log_path``."""

    def __init__(self, cluster: Cluster, log_path: Path, *, mode: str = "auto",
                 identity: str = "e2e-operator", kubeconfig: Path | None = None,
                 **settings: Any) -> None:
        self.cluster, self.log_path = cluster, log_path
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "worker")),
            "KVPILOT_MODE": mode, "KVPILOT_IDENTITY": identity,
            "KVPILOT_NAMESPACE": NAMESPACE, "KVPILOT_LEASE_SECONDS": "3",
            "KVPILOT_RECONCILE_SECONDS": "2", "KVPILOT_METRICS_PORT": "0",
            "KVPILOT_HEALTH_PORT": "0",
            **{f"KVPILOT_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        ensure_namespace(self.cluster)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvpilot.cli", "operator", f"--kubeconfig={self.kubeconfig}"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60,
             interval: float = 0.5, log: Callable[[], str] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` (and a log)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    tail = f"\n--- operator log ---\n{log()[-6000:]}" if log else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){tail}")


def chart_operator(cluster: Cluster, state: Path, identity: str,
                   **settings: str) -> OperatorProcess:
    """The chart installed (helm's state under ``state / "helm"``) and an operator, not
    yet started, run here as the chart runs it: the chart Deployment's settings, the
    chart ServiceAccount's token, with short intervals for tests; ``settings`` override
    any of them."""
    from e2e.chart import (
        CHART, NAMESPACE, RELEASE, chart_settings, kube_helm, service_account_kubeconfig,
    )

    kube_helm(cluster, state / "helm", "install", RELEASE, str(CHART), "-n", NAMESPACE,
              "--create-namespace", "--wait=false")
    wait_for("the Model CRD served", lambda: cluster.kubectl(
        "get", "crd", "models.kvpilot.dev", check=False).returncode == 0, 60)
    cluster.kubectl("wait", "--for=condition=Established", "crd/models.kvpilot.dev",
                    "--timeout=60s", timeout=70)
    chart = chart_settings(cluster)
    chart.pop("identity", None)
    chart.update(reconcile_seconds="2", lease_seconds="3", scrape_seconds="1",
                 drain_timeout_seconds="60", metrics_port="0", health_port="0", **settings)
    return OperatorProcess(cluster, state / "operator.log", identity=identity,
                           kubeconfig=service_account_kubeconfig(cluster, state / "sa"),
                           **chart)
