"""The Helm chart from the e2e side: run helm, install the chart, act as its operator.

Used by the chart's tests and by the demo: ``kube_helm`` runs helm against a local
cluster with a scratch home, ``service_account_kubeconfig`` makes a kubeconfig with the
token of the chart's ServiceAccount, ``chart_settings`` reads the operator settings the
chart's Deployment passes (so an operator run out of cluster runs as the chart would).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from e2e import build
from e2e.cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kvpilot"
RELEASE = "kvpilot"
NAMESPACE = "kvpilot-system"
OPERATOR = "kvpilot-operator"


def helm(*args: str, home: Path | None = None, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess:
    """helm with its config and caches in a scratch HOME (never the user's)."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {"HOME": str(home or scratch), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([str(build.binary("helm")), *args], capture_output=True,
                              text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def container_env(deployment: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The operator container's env, fieldRefs resolved as the kubelet would."""
    pod = deployment["spec"]["template"]
    fields = {"metadata.name": pod_name,
              "metadata.namespace": deployment["metadata"]["namespace"]}
    env = {}
    for var in pod["spec"]["containers"][0]["env"]:
        if "valueFrom" in var:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # the API server stores an empty value as no value
            env[var["name"]] = var.get("value", "")
    return env


def kube_helm(cluster: Cluster, home: Path, *args: str, check: bool = True):
    return helm(*args, f"--kubeconfig={cluster.kubeconfig}", home=home, check=check,
                timeout=300)


def service_account_kubeconfig(cluster: Cluster, path: Path, account: str = "kvpilot") -> Path:
    """A kubeconfig at ``path`` with a token of the chart's ServiceAccount ``account`` (the
    operator's by default; ``kvpilot-router`` is the router's)."""
    token = cluster.kubectl("create", "token", account, "-n", NAMESPACE,
                            "--duration=1h").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster.server, "certificate-authority": str(cluster.pki.ca_cert)}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": account}}],
        "current-context": account,
    }))
    return path


def chart_settings(cluster: Cluster) -> dict[str, str]:
    """The settings the chart's Deployment gives the operator, as OperatorProcess takes them."""
    deployment = cluster.get("deployment", "-n", NAMESPACE, OPERATOR)
    env = container_env(deployment, "helm-e2e")
    return {k.removeprefix("KVPILOT_").lower(): v for k, v in env.items()}
