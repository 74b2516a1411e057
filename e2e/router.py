"""``kvpilot router`` run as a process against the local cluster, for e2e tests and the
demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import _die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[1]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with ``labels`` in a Prometheus text page."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class RouterProcess:
    """``kvpilot router`` out of cluster, with its log kept."""

    def __init__(self, kubeconfig: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            str(ROOT / p) for p in ("operator", "worker"))}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpilot.router", f"--kubeconfig={kubeconfig}",
                 "--host=127.0.0.1", f"--port={self.port}", *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def replicas(self, model: str) -> int:
        """Ready replicas of ``model`` as the router sees them."""
        data = httpx.get(self.url + "/v1/models", timeout=5).json()["data"]
        return next((m["ready_replicas"] for m in data if m["id"] == model), 0)

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(httpx.get(self.url + "/metrics", timeout=5).text, name, **labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sum(text: str, name: str, **labels: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
