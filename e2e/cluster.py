"""A real local Kubernetes control plane on 127.0.0.1, with KWOK GPU nodes.

``python -m e2e.cluster up|down|status|env`` runs etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok as ordinary processes (no containers,
no root-only tricks), each in its own process group so ``down`` can stop all of them.
Binaries come from :mod:`e2e.build` (compiled once from the Go module proxy).

KWOK keeps the fake nodes Ready and moves pods bound to them to Running. Each node gets a
pod CIDR inside 127.0.0.0/8, so a pod's IP is a loopback address: a test can start a real
worker process listening on the pod's own IP, and the operator reaches it exactly as it
would in a cluster. A cluster made with ``real_workers`` is one whose kvpilot worker pods
``e2e.workers`` runs, with a kubelet's readiness: KWOK starts them not Ready (the
harness marks them Ready when their worker answers), and, since EndpointSlices refuse
loopback addresses, their nodes' pod CIDRs lie in ``ROUTED_POD_CIDR``, which a ``local``
route on ``lo`` makes this host's own (that one step needs CAP_NET_ADMIN).

State (certificates, kubeconfig, etcd data, logs, pids) lives in one directory, by
default ``~/.cache/kvpilot/clusters/<name>``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e import build
from e2e.pki import PKI, create_pki

HERE = Path(__file__).resolve().parent
SERVICE_CIDR = "10.96.0.0/16"  # allocation range for Service objects only; never routed
DEFAULT_POD_CIDR = "127.1.0.0/16"
# RFC 2544's benchmarking range: on no real network, so routing it to this host takes
# nothing from anyone.
ROUTED_POD_CIDR = "198.18.0.0/15"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
# Service accounts here have their every request audited (e2e/test_helm.py runs the
# operator under the chart's one).
AUDITED_NAMESPACE = "kvpilot-system"


def log(message: str) -> None:
    print(f"[kvpilot cluster] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Resolved here, not in the child: a preexec hook runs between fork and exec, where
# loading a library (dlopen takes locks another thread may hold) can deadlock the child.
_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl


def route_pod_cidr() -> str | None:
    """Make ``ROUTED_POD_CIDR`` local to this host (a process binds any address in it, as
    one does 127.x); None when it is, else why it cannot be."""
    try:
        subprocess.run(["ip", "route", "replace", "local", ROUTED_POD_CIDR, "dev", "lo"],
                       check=True, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    except subprocess.CalledProcessError as err:
        return f"ip route replace local {ROUTED_POD_CIDR} dev lo: {err.stderr.strip()}"
    return None


def _die_with_parent() -> None:
    """preexec hook: the child gets SIGTERM when the thread that started it ends."""
    os.setsid()
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Cluster:
    """One local control plane. ``up()`` starts it, ``down()`` stops it and removes state.

    ``tie_to_parent`` makes every component die with the current process: tests use it
    so a crashed or killed test run leaves no control plane behind.
    ``node_monitor_grace`` (e.g. "10m") lets fake nodes' heartbeats be late that long
    before the node controller marks them Unknown: KWOK heartbeating for a thousand
    nodes on a small, busy machine falls behind Kubernetes' default of 50 s.
    """

    state: Path
    tie_to_parent: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    node_monitor_grace: str | None = None
    real_workers: bool = False  # see the module's docstring

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def pki(self) -> PKI:
        return PKI(self.state / "pki")

    @property
    def _pidfile(self) -> Path:
        return self.state / "pids.json"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    # -- lifecycle ---------------------------------------------------------------------

    def up(self, timeout: float = 120.0) -> "Cluster":
        if self.running():
            raise RuntimeError(f"a cluster is already running from {self.state}; "
                               "run `python -m e2e.cluster down` first")
        binaries = build.build_all()
        if self.state.exists():  # left over from a run that failed or was killed
            shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        self.ports = {
            "etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port(),
            "controller-manager": free_port(), "scheduler": free_port(),
        }
        create_pki(self.state / "pki")
        self._write_kubeconfig()
        self._write_kwok_config()
        (self.state / "ports.json").write_text(json.dumps(self.ports))
        started = time.monotonic()
        try:
            self._start("etcd", self._etcd_args(binaries["etcd"]))
            self._start("kube-apiserver", self._apiserver_args(binaries["kube-apiserver"]))
            self._wait_ready(started + timeout)
            self._start("kube-controller-manager",
                        self._controller_manager_args(binaries["kube-controller-manager"]))
            self._start("kube-scheduler", self._scheduler_args(binaries["kube-scheduler"]))
            self._start("kwok", self._kwok_args(binaries["kwok"]))
            self._wait_for_default_service_account(started + timeout)
        except BaseException:
            self.down(keep_state=True)  # keep the logs for whoever reads the error
            raise
        log(f"control plane up at {self.server} in {time.monotonic() - started:.1f}s; "
            f"KUBECONFIG={self.kubeconfig}")
        return self

    def down(self, keep_state: bool = False) -> None:
        pids = self._pids()
        for name in reversed(COMPONENTS):
            if name in pids:
                _terminate(pids[name])
        self._pidfile.unlink(missing_ok=True)
        if not keep_state and self.state.exists():
            shutil.rmtree(self.state, ignore_errors=True)

    def running(self) -> bool:
        return any(_alive(pid) for pid in self._pids().values())

    def stop_component(self, name: str) -> None:
        """Stop one component (SIGTERM, then SIGKILL): an outage for fault tests."""
        pid = self._pids().get(name)
        if pid is None:
            raise ValueError(f"no {name} was started from {self.state}")
        _terminate(pid)

    def start_component(self, name: str, timeout: float = 120.0) -> None:
        """Start a stopped component again with its arguments and state (etcd keeps its
        data directory); for the API server, wait until it is ready."""
        args = {"etcd": self._etcd_args, "kube-apiserver": self._apiserver_args,
                "kube-controller-manager": self._controller_manager_args,
                "kube-scheduler": self._scheduler_args, "kwok": self._kwok_args}[name]
        self._start(name, args(build.binary(name)))
        if name == "kube-apiserver":
            self._wait_ready(time.monotonic() + timeout)

    def restart(self, name: str, down_seconds: float = 0.0, timeout: float = 120.0) -> None:
        """Stop ``name``, leave it down ``down_seconds``, start it again."""
        self.stop_component(name)
        time.sleep(down_seconds)
        self.start_component(name, timeout)

    def status(self) -> dict[str, Any]:
        pids = self._pids()
        result: dict[str, Any] = {
            "state": str(self.state),
            "components": {name: ("running" if name in pids and _alive(pids[name]) else "stopped")
                           for name in COMPONENTS},
        }
        if self._load_ports() and self.running():
            result["server"] = self.server
            result["kubeconfig"] = str(self.kubeconfig)
            try:
                result["ready"] = self._ready()
            except httpx.HTTPError:
                result["ready"] = False
        return result

    # -- using it ----------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(build.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def get(self, *args: str) -> dict[str, Any]:
        """``kubectl get ARGS -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, objects: list[dict[str, Any]] | dict[str, Any]) -> None:
        items = objects if isinstance(objects, list) else [objects]
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        self.kubectl("apply", "--server-side", "--field-manager=kvpilot-e2e", "-f", "-",
                     input=json.dumps(doc))

    def http(self) -> httpx.Client:
        """An httpx client authenticated as cluster admin."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return httpx.Client(base_url=self.server, verify=context, timeout=10)

    # -- internals ---------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        try:
            return json.loads(self._pidfile.read_text())
        except (OSError, ValueError):
            return {}

    def _load_ports(self) -> bool:
        try:
            self.ports = json.loads((self.state / "ports.json").read_text())
            return True
        except (OSError, ValueError):
            return False

    def _start(self, name: str, args: list[str]) -> None:
        logfile = open(self.state / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.tie_to_parent else os.setsid,
        )
        logfile.close()
        pids = self._pids()
        pids[name] = proc.pid
        self._pidfile.write_text(json.dumps(pids))
        log(f"started {name} (pid {proc.pid})")

    def _check_alive(self) -> None:
        for name, pid in self._pids().items():
            if not _alive(pid):
                tail = (self.state / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited during start-up; end of its log:\n{tail}")

    def _ready(self) -> bool:
        with self.http() as client:
            return client.get("/readyz").status_code == 200

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self._ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver not ready at {self.server}; see {self.state}/logs")

    def _wait_for_default_service_account(self, deadline: float) -> None:
        # Pods are refused until the controller-manager created namespace `default`'s
        # service account, so "up" means "a pod can be created".
        while time.monotonic() < deadline:
            self._check_alive()
            with self.http() as client:
                if client.get("/api/v1/namespaces/default/serviceaccounts/default").status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError("the default service account never appeared; "
                           f"see {self.state}/logs/kube-controller-manager.log")

    def _write_kubeconfig(self) -> None:
        pki = self.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kvpilot-local", "cluster": {
                "server": self.server, "certificate-authority": str(pki.ca_cert)}}],
            "users": [{"name": "kvpilot-admin", "user": {
                "client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}}],
            "contexts": [{"name": "kvpilot-local", "context": {
                "cluster": "kvpilot-local", "user": "kvpilot-admin", "namespace": "default"}}],
            "current-context": "kvpilot-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))

    def _write_kwok_config(self) -> None:
        stages = (HERE / "kwok-stages.yaml").read_text()
        if self.real_workers:  # worker pods are Ready when their worker says so
            ready = '        status: "True"\n        type: {}\n'
            worker = ('{{ with .metadata.labels }}{{ if eq (printf "%v" (index . '
                      '"app.kubernetes.io/managed-by")) "kvpilot" }}{{ $worker = true }}'
                      '{{ end }}{{ end }}')
            stages = stages.replace("      {{ $now := Now }}\n\n      conditions:",
                                    "      {{ $now := Now }}\n      {{ $worker := false }}"
                                    f"{worker}\n\n      conditions:", 1)
            for kind in ("Ready", "ContainersReady"):
                assert ready.format(kind) in stages, kind
                stages = stages.replace(ready.format(kind), (
                    '        status: {{ if $worker }}"False"{{ else }}"True"{{ end }}\n'
                    f"        type: {kind}\n"))
        (self.state / "kwok.yaml").write_text(stages)

    def _etcd_args(self, binary: Path) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            str(binary), "--name=kvpilot", f"--data-dir={self.state / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kvpilot={peer}", "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648", "--log-level=warn",
        ]

    def _apiserver_args(self, binary: Path) -> list[str]:
        pki = self.pki
        return [
            str(binary),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.state / 'apiserver-certs'}",
            f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={self._write_audit_policy()}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-maxsize=200",
            "--v=1",
        ]

    @property
    def audit_log(self) -> Path:
        return self.state / "logs" / "audit.log"

    def _write_audit_policy(self) -> Path:
        # Writes, at metadata level: tests count a client's API writes from it. Every
        # request of the service accounts in AUDITED_NAMESPACE too, reads included, so a
        # test can see each call (and each 403) of a component running under one.
        path = self.state / "audit-policy.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata",
                       "userGroups": [f"system:serviceaccounts:{AUDITED_NAMESPACE}"]},
                      {"level": "Metadata", "verbs": list(WRITE_VERBS)},
                      {"level": "None"}],
        }))
        return path

    def _audit_events(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        out = []
        for line in self.audit_log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def audit_writes(self, user_agent_prefix: str | tuple[str, ...]) -> list[dict[str, Any]]:
        """Write requests the API server completed for clients of that user agent (or
        of any of several)."""
        return [e for e in self._audit_events() if e.get("verb") in WRITE_VERBS
                and e.get("userAgent", "").startswith(user_agent_prefix)]

    def audit_requests(self, username: str) -> list[dict[str, Any]]:
        """Every request of that user, reads included: a service account of
        AUDITED_NAMESPACE (``system:serviceaccount:NS:NAME``); others only write."""
        return [e for e in self._audit_events()
                if (e.get("user") or {}).get("username") == username]

    def _component_common(self, port_key: str) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports[port_key]}",
            f"--cert-dir={self.state / (port_key + '-certs')}",
            "--leader-elect=false", "--v=1",
        ]

    def _controller_manager_args(self, binary: Path) -> list[str]:
        pki = self.pki
        return [
            str(binary), *self._component_common("controller-manager"),
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            *([f"--node-monitor-grace-period={self.node_monitor_grace}"]
              if self.node_monitor_grace else []),
        ]

    def _scheduler_args(self, binary: Path) -> list[str]:
        return [str(binary), *self._component_common("scheduler")]

    def _kwok_args(self, binary: Path) -> list[str]:
        return [
            str(binary), f"--kubeconfig={self.kubeconfig}", f"--config={self.state / 'kwok.yaml'}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--cidr={DEFAULT_POD_CIDR}", "--node-ip=127.0.0.1",
        ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid):
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def default_state(name: str) -> Path:
    return build.cache_root() / "clusters" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="kvpilot", help="cluster name (state directory)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build binaries if needed, start the control plane")
    up.add_argument("--fleet", type=Path, help="fleet YAML: create these fake GPU nodes")
    up.add_argument("--crds", type=Path, default=Path("crds"), help="install CRDs from here")
    up.add_argument("--dra", action="store_true",
                    help="also publish the fleet's GPUs as DRA ResourceSlices")
    sub.add_parser("down", help="stop every process and remove the state directory")
    sub.add_parser("status", help="show components and readiness")
    sub.add_parser("env", help="print `export KUBECONFIG=...` for a shell")
    args = parser.parse_args(argv)
    cluster = Cluster(default_state(args.name))
    try:
        if args.command == "up":
            cluster.up()
            if args.crds and args.crds.is_dir():
                install_crds(cluster, args.crds)
            if args.fleet:
                from e2e.fleet import create_fleet

                nodes = create_fleet(cluster, args.fleet, dra=args.dra)
                log(f"created {len(nodes)} fake GPU nodes from {args.fleet}")
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            was_running = cluster.running()
            cluster.down()
            log("stopped" if was_running else "nothing was running")
        elif args.command == "status":
            print(json.dumps(cluster.status(), indent=2))
        elif args.command == "env":
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError) as err:
        log(f"error: {err}")
        return 1
    return 0


def install_crds(cluster: Cluster, directory: Path, timeout: float = 60) -> list[str]:
    """Apply every CRD in directory and wait until the API server serves them."""
    names = []
    for path in sorted(directory.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
        names.append(yaml.safe_load(path.read_text())["metadata"]["name"])
    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}",
                        f"--timeout={int(timeout)}s", timeout=timeout + 10)
    return names


if __name__ == "__main__":
    sys.exit(main())
