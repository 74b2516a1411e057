"""Real worker processes for KWOK pods: what a kubelet would run, started by the test.

KWOK marks pods Running without running anything. For every Running worker pod of a
Model whose checkpoint (``spec.source``) exists on this machine, this harness starts the
real ``python -m kvpilot.worker`` on the pod's own loopback IP and port, on CPU, with
the environment the operator put in the pod (the Model spec, the HBM budget, the TP
degree), and stops it (SIGTERM) when the pod goes. Each process's output is kept in a
log file, for whoever reads a failed test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvpilot.api import contract
from kvpilot.operator.objects import LABEL_MODEL, SELECTOR

from e2e.cluster import Cluster, _die_with_parent

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Process:
    pod: str
    model: str
    ip: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"


def _command_env(pod: dict) -> tuple[list[str], dict[str, str], str, int] | None:
    """The worker's argv, env, IP and port for a pod, or None when it has no local
    checkpoint."""
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    args = c.get("args", [])
    model_dir = args[args.index("--model") + 1] if "--model" in args else None
    if not model_dir or not Path(model_dir).is_dir():
        return None
    port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "http"),
                contract.WORKER_PORT)
    ip = pod["status"]["podIP"]
    argv = [sys.executable, "-m", "kvpilot.worker", "--model", model_dir, "--host", ip,
            "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    return argv, env, ip, port


@dataclass
class Workers:
    """Follows the cluster's worker pods and keeps one real worker per Running pod."""

    cluster: Cluster
    logs: Path
    processes: dict[str, Process] = field(default_factory=dict)
    started: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "Workers":
        self.logs.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._follow, daemon=True, name="workers").start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for name in list(self.processes):
                self._end(name)

    def ready(self, model: str) -> list[Process]:
        """Workers of ``model`` whose /ready answers 200 (what a readiness probe sees)."""
        with self._lock:
            procs = [p for p in self.processes.values() if p.model == model]
        out = []
        for p in procs:
            try:
                if httpx.get(p.url + contract.PATH_READY, timeout=1).status_code == 200:
                    out.append(p)
            except httpx.HTTPError:
                pass
        return out

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.cluster.get("pods", "-A", "-l", SELECTOR)["items"]
            except Exception:  # the API server may be busy; look again
                time.sleep(0.5)
                continue
            live = {}
            for p in pods:
                if p["status"].get("phase") == "Running" and p["status"].get("podIP") \
                        and not p["metadata"].get("deletionTimestamp"):
                    live[p["metadata"]["name"]] = p
            with self._lock:
                for name in set(self.processes) - set(live):
                    self._end(name)
                for name, pod in live.items():
                    if name not in self.processes:
                        self._begin(name, pod)
            time.sleep(0.3)

    def _begin(self, name: str, pod: dict) -> None:
        found = _command_env(pod)
        if found is None:
            return
        argv, env, ip, port = found
        log = self.logs / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                str(ROOT / p) for p in ("operator", "worker"))},
            preexec_fn=_die_with_parent)
        out.close()
        self.processes[name] = Process(name, pod["metadata"]["labels"][LABEL_MODEL],
                                       ip, port, proc, log)
        self.started += 1

    def _end(self, name: str) -> None:
        p = self.processes.pop(name)
        if p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGTERM)
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()

    def tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-chars:]}"
                         for f in sorted(self.logs.glob("*.log")))


def tiny_checkpoint(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "kvpilot.worker.tiny", str(path)], check=True,
                   cwd=ROOT, capture_output=True, timeout=120)
    return path


def tiny_model(name: str, checkpoint: Path, *, context: int = 512, seqs: int = 4) -> dict:
    """A Model that describes the checkpoint truthfully; its KV pool is context x seqs."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    return {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": str(checkpoint),
            "weights": {"bytes": weights, "dtype": "fp32"},
            "architecture": {
                "layers": cfg["num_hidden_layers"],
                "attentionHeads": cfg["num_attention_heads"],
                "kvHeads": cfg["num_key_value_heads"],
                "headDim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                "maxContextTokens": cfg["max_position_embeddings"]},
            "sla": {"contextTokens": context, "concurrentSequences": seqs},
            "replicas": 1, "minReplicas": 1, "maxReplicas": 3,
            "autoscaling": {"enabled": True, "targetKvPressurePercent": 50,
                            "scaleUpStabilizationSeconds": 3,
                            "scaleDownStabilizationSeconds": 6, "cooldownSeconds": 3},
        },
    }
