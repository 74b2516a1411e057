"""Real worker processes for KWOK pods: what a kubelet would do, done by the test.

KWOK marks pods Running and Ready without running anything. For every Running worker
pod whose weights this machine can reach, this harness does a kubelet's part for real:

- volumes: a ``hostPath`` is the directory of that path here (``DirectoryOrCreate``
  creates it), an ``emptyDir`` a fresh directory per pod; an argument under a mount
  path is rewritten to the directory behind it (what a bind mount does). Pods whose
  weights are on a PersistentVolumeClaim or an image volume are left to KWOK alone.
- init containers run first, in order, with the container's env (``secretKeyRef``
  resolved from the Secret, as the kubelet does); one that fails is retried with a
  growing back-off, and its status says so (``CrashLoopBackOff``, the exit code and the
  termination message), as the kubelet reports it.
- the worker (``python -m kvpilot.worker``, on CPU, on the pod's own loopback IP and
  port, with the env the operator put in the pod) is started and restarted when it
  exits, with the same back-off and status;
- the readiness probe: the pod's ``Ready`` condition follows the worker's ``/ready``,
  so the EndpointSlice controller (the real kube-controller-manager) adds and removes
  the pod from its Model's Service as it would in a cluster.

Each container's output is kept in a log file, for whoever reads a failed test.
"""

from __future__ import annotations

import base64
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
from kvpilot.api.checkpoint import weights_from_directory
from kvpilot.operator.objects import LABEL_MODEL, SELECTOR, WORKER_CONTAINER

from e2e.cluster import Cluster, _die_with_parent

ROOT = Path(__file__).resolve().parents[1]
BACKOFF = (2.0, 4.0, 8.0, 16.0)  # the kubelet's 10 s doubling to 300 s, shortened for tests
PYTHONPATH = os.pathsep.join(str(ROOT / p) for p in ("operator", "worker"))


@dataclass
class Process:
    pod: str
    model: str
    ip: str
    port: int
    proc: subprocess.Popen | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"


def _volumes(pod: dict, scratch: Path) -> dict[str, Path] | None:
    """Volume name -> its directory here; None when a volume cannot be had here."""
    out = {}
    for v in pod["spec"].get("volumes") or []:
        if "hostPath" in v:
            path = Path(v["hostPath"]["path"])
            if v["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            if not path.is_dir():
                return None
            out[v["name"]] = path
        elif "emptyDir" in v:
            out[v["name"]] = scratch / v["name"]
            out[v["name"]].mkdir(parents=True, exist_ok=True)
        else:
            return None  # a PersistentVolumeClaim or an image: not on this machine
    return out


def _mounted(arg: str, mounts: list[tuple[str, Path]]) -> str:
    for mount_path, host in mounts:
        if arg == mount_path or arg.startswith(mount_path.rstrip("/") + "/"):
            return str(host) + arg[len(mount_path.rstrip("/")):]
    return arg


def _mounts(container: dict, volumes: dict[str, Path]) -> list[tuple[str, Path]]:
    return sorted(((m["mountPath"], volumes[m["name"]])
                   for m in container.get("volumeMounts") or []),
                  key=lambda m: -len(m[0]))  # the deepest mount first


def _argv(command: list[str]) -> list[str]:
    return [sys.executable, *command[1:]] if command and command[0] == "python" else command


def _last_lines(log: Path, lines: int = 80, size: int = 2048) -> str:
    """What the kubelet takes from the logs for FallbackToLogsOnError."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-size:]


@dataclass
class _Pod:
    """One pod's containers, run by a thread of its own."""

    name: str
    namespace: str
    model: str
    raw: dict
    workers: "Workers"
    process: Process | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    statuses: dict[str, dict] = field(default_factory=dict)  # container name -> status
    ready: bool | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - a harness bug must show, not hang
            (self.workers.logs / f"{self.name}.harness.log").write_text(repr(err))

    def _run(self) -> None:
        spec = self.raw["spec"]
        scratch = self.workers.logs / "volumes" / self.raw["metadata"].get("uid", self.name)
        volumes = _volumes(self.raw, scratch)
        if volumes is None:
            return
        self._set_ready(False)
        for c in spec.get("initContainers") or []:
            if not self._until_done(c, volumes):
                return
        (c,) = [c for c in spec["containers"] if c["name"] == WORKER_CONTAINER]
        self._serve(c, volumes)

    def _env(self, c: dict) -> dict[str, str] | str:
        """The container's env; a string says why it cannot be made (as the kubelet's
        CreateContainerConfigError does)."""
        env = {}
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "secretKeyRef" in (e.get("valueFrom") or {}):
                ref = e["valueFrom"]["secretKeyRef"]
                found = self.workers.cluster.kubectl(
                    "get", "secret", ref["name"], "-n", self.namespace, "-o", "json",
                    check=False)
                if found.returncode != 0:
                    return f'secret "{ref["name"]}" not found'
                data = json.loads(found.stdout).get("data") or {}
                if ref["key"] not in data:
                    return f"couldn't find key {ref['key']} in Secret {self.namespace}/{ref['name']}"
                env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return env

    def _start(self, c: dict, volumes: dict[str, Path], argv: list[str], env: dict[str, str],
               termination: Path) -> subprocess.Popen:
        mounts = _mounts(c, volumes)
        log = self.workers.logs / f"{self.name}.{c['name']}.log"
        termination.unlink(missing_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen(
                [_mounted(a, mounts) for a in argv], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **env, "PYTHONPATH": PYTHONPATH,
                     contract.ENV_TERMINATION_LOG: str(termination)},
                preexec_fn=_die_with_parent)

    def _ended(self, c: dict, key: str, code: int, termination: Path, restarts: int) -> None:
        message = termination.read_text() if termination.exists() else ""
        if not message and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _last_lines(self.workers.logs / f"{self.name}.{c['name']}.log")
        self._status(key, c["name"], restarts, {"waiting": {"reason": "CrashLoopBackOff"}},
                     {"terminated": {"exitCode": code, "reason": "Error",
                                     "message": message}})

    def _until_done(self, c: dict, volumes: dict[str, Path]) -> bool:
        """Run an init container until it succeeds; False if the pod went first."""
        key = "initContainerStatuses"
        termination = self.workers.logs / f"{self.name}.{c['name']}.termination"
        for restarts in range(10_000):
            env = self._env(c)
            if isinstance(env, str):
                self._status(key, c["name"], restarts, {"waiting": {
                    "reason": "CreateContainerConfigError", "message": env}})
            else:
                self._status(key, c["name"], restarts, {"running": {}})
                proc = self._start(c, volumes, _argv(c["command"]) + c.get("args", []), env,
                                   termination)
                code = self._wait(proc)
                if code is None:
                    return False
                if code == 0:
                    self._status(key, c["name"], restarts, {"terminated": {
                        "exitCode": 0, "reason": "Completed"}})
                    return True
                self._ended(c, key, code, termination, restarts + 1)
            if self.stop.wait(BACKOFF[min(restarts, len(BACKOFF) - 1)]):
                return False
        return False

    def _serve(self, c: dict, volumes: dict[str, Path]) -> None:
        """Run the worker, restart it when it exits, and mirror /ready into the pod."""
        args = c.get("args", [])
        model_dir = args[args.index("--model") + 1] if "--model" in args else None
        if model_dir is None:
            return
        port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "http"),
                    contract.WORKER_PORT)
        ip = self.raw["status"]["podIP"]
        argv = [sys.executable, "-m", "kvpilot.worker", "--model", model_dir, "--host", ip,
                "--port", str(port), "--device", "cpu", "--log-level", "warning"]
        env = self._env(c)
        if isinstance(env, str):
            return
        termination = self.workers.logs / f"{self.name}.worker.termination"
        key = "containerStatuses"
        for restarts in range(10_000):
            proc = self._start(c, volumes, argv, env, termination)
            self.process = Process(self.name, self.model, ip, port, proc,
                                   self.workers.logs / f"{self.name}.{c['name']}.log")
            with self.workers.lock:
                self.workers.started += 1
            self._status(key, c["name"], restarts, {"running": {}})
            while proc.poll() is None and not self.stop.is_set():
                self._set_ready(_answers(self.process.url + contract.PATH_READY))
                self.stop.wait(0.3)
            if self.stop.is_set():
                return
            self._set_ready(False)
            self._ended(c, key, proc.returncode, termination, restarts + 1)
            if self.stop.wait(BACKOFF[min(restarts, len(BACKOFF) - 1)]):
                return

    def _wait(self, proc: subprocess.Popen) -> int | None:
        while proc.poll() is None:
            if self.stop.wait(0.2):
                return None
        return proc.returncode

    def _status(self, key: str, name: str, restarts: int, state: dict,
                last: dict | None = None) -> None:
        status = {"name": name, "restartCount": restarts, "state": state,
                  "ready": "running" in state, "image": "kvpilot/worker", "imageID": ""}
        if last:
            status["lastState"] = last
        self.statuses[name] = status
        self._patch({key: [s for n, s in self.statuses.items()
                           if (key == "initContainerStatuses") == self._is_init(n)]})

    def _is_init(self, name: str) -> bool:
        return any(c["name"] == name for c in self.raw["spec"].get("initContainers") or [])

    def _set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        value = "True" if ready else "False"
        self._patch({"conditions": [{"type": "Ready", "status": value},
                                    {"type": "ContainersReady", "status": value}]})

    def _patch(self, status: dict) -> None:
        self.workers.cluster.kubectl(
            "patch", "pod", self.name, "-n", self.namespace, "--subresource=status",
            "--type=strategic", "-p", json.dumps({"status": status}), check=False)

    def end(self) -> None:
        self.stop.set()
        proc = self.process.proc if self.process else None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Workers:
    """Follows the cluster's worker pods and does a kubelet's part for each Running one."""

    cluster: Cluster
    logs: Path
    # The Models served (None: every one); the pods of others are only made Ready, as
    # KWOK alone makes pods on a cluster without ``real_workers``.
    only: frozenset[str] | None = None
    pods: dict[str, _Pod] = field(default_factory=dict)
    _left: set[str] = field(default_factory=set)
    started: int = 0  # worker processes started, restarts included
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Workers":
        self.logs.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._follow, daemon=True, name="workers").start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for name in list(self.pods):
                self.pods.pop(name).end()

    @property
    def processes(self) -> dict[str, Process]:
        """Pod name -> its running worker process."""
        with self.lock:
            return {n: p.process for n, p in self.pods.items()
                    if p.process is not None and p.process.proc.poll() is None}

    def ready(self, model: str) -> list[Process]:
        """Workers of ``model`` whose /ready answers 200 (what a readiness probe sees)."""
        return [p for p in self.processes.values()
                if p.model == model and _answers(p.url + contract.PATH_READY)]

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.cluster.get("pods", "-A", "-l", SELECTOR)["items"]
            except Exception:  # the API server may be busy; look again
                time.sleep(0.5)
                continue
            live = {}
            for p in pods:
                if p["status"].get("phase") != "Running" or not p["status"].get("podIP") \
                        or p["metadata"].get("deletionTimestamp"):
                    continue
                name = p["metadata"]["name"]
                if self.only is None or p["metadata"]["labels"][LABEL_MODEL] in self.only:
                    live[name] = p
                elif name not in self._left:
                    self._left.add(name)
                    _Pod(name, p["metadata"]["namespace"], "", p, self)._set_ready(True)
            with self.lock:
                for name in set(self.pods) - set(live):
                    self.pods.pop(name).end()
                for name, raw in live.items():
                    if name not in self.pods:
                        pod = _Pod(name, raw["metadata"]["namespace"],
                                   raw["metadata"]["labels"][LABEL_MODEL], raw, self)
                        self.pods[name] = pod
                        threading.Thread(target=pod.run, daemon=True, name=name).start()
            time.sleep(0.3)

    def tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-chars:]}"
                         for f in sorted(self.logs.glob("*.log")))


def endpoints(cluster: Cluster, model: str, namespace: str = "default") -> list[str]:
    """The URLs of the ready endpoints of a Model's Service, as the kube-controller-manager
    wrote them in its EndpointSlices (what kube-proxy would send requests to)."""
    slices = cluster.get("endpointslices", "-n", namespace, "-l",
                         f"kubernetes.io/service-name={model}")["items"]
    out = []
    for s in slices:
        port = next((p["port"] for p in s.get("ports") or [] if p.get("name") == "http"), None)
        for e in s.get("endpoints") or []:
            if (e.get("conditions") or {}).get("ready") and port:
                out.extend(f"http://{a}:{port}" for a in e["addresses"])
    return sorted(out)


def tiny_checkpoint(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "kvpilot.worker.tiny", str(path)], check=True,
                   cwd=ROOT, capture_output=True, timeout=120)
    return path


def tiny_model(name: str, checkpoint: Path, *, context: int = 512, seqs: int = 4,
               source: str | None = None) -> dict:
    """A Model that describes the checkpoint truthfully; its KV pool is context x seqs.
    Its weights come from ``source`` (default: the checkpoint's directory on the node)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    weights = weights_from_directory(checkpoint)["bytes"]
    return {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": source or f"host://{checkpoint.resolve()}",
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
