"""Shared by the chart tests: run helm on the chart, render it into objects."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from e2e import build
from e2e.chart import CHART, NAMESPACE, RELEASE, container_env, helm  # noqa: F401 (shared)

KUBE_VERSION = build.KUBERNETES_VERSION.lstrip("v")

# Every optional object on, each with a value that shows it reached its template.
ALL_FEATURES: dict[str, Any] = {
    "operator": {"replicas": 2},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True}, "dashboard": {"enabled": True}},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True, "apiServerCIDRs": ["10.0.0.1/32"],
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "monitoring"}}}]},
}


def values_args(values: dict[str, Any] | None, scratch: Path) -> list[str]:
    if not values:
        return []
    path = scratch / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def template(values: dict[str, Any] | None = None, *args: str, chart: Path = CHART,
             check: bool = True) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as scratch:
        return helm("template", RELEASE, str(chart), "-n", NAMESPACE,
                    f"--kube-version={KUBE_VERSION}", *values_args(values, Path(scratch)),
                    *args, check=check)


def render(values: dict[str, Any] | None = None, *args: str,
           chart: Path = CHART) -> list[dict[str, Any]]:
    """The chart's objects, as helm template renders them."""
    return [o for o in yaml.safe_load_all(template(values, *args, chart=chart).stdout) if o]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {kinds(objects)}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str, tuple[str, ...]], set[str]]:
    """(apiGroup, resource, resourceNames) -> verbs that RBAC rules grant."""
    out: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource, tuple(rule.get("resourceNames", ())))
                out.setdefault(key, set()).update(rule["verbs"])
    return out
