"""The Grafana dashboard in the chart: every query names metrics that exist (the
worker's, from ``kvpilot.api.contract``, and the operator's own), the chart carries it
only when asked, and the operator's gauges it draws are set from what they say."""

from __future__ import annotations

import json
import re

from kvpilot.api import contract
from kvpilot.api.model import ModelSpec
from kvpilot.operator import metrics
from kvpilot.operator.placement import Existing, Node
from tests.chart_helpers import CHART, kinds, one, render

DASHBOARD = CHART / "files" / "dashboards" / "kvpilot.json"
GiB = 2**30
# what prometheus-client and Prometheus add to a family's name in the exposition
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
PROMQL_WORDS = {"by", "sum", "rate", "increase", "histogram_quantile", "label_values",
                "le", "namespace", "model", "node", "direction", "cause"}


def known_names() -> set[str]:
    worker = {v for k, v in vars(contract).items()
              if k.isupper() and isinstance(v, str) and v.startswith(("kvpilot_", "vllm:"))}
    operator = {m.name for m in metrics.REGISTRY.collect()}
    return worker | operator


def queries(dashboard: dict) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in dashboard["templating"]["list"]
            if v["type"] == "query"]
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers not inside quotes or
    braces' label names, that are not PromQL's own words."""
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values and such
    bare = re.sub(r"\{[^}]*\}", "{}", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "[]", bare)  # ranges
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {n for n in names if n not in PROMQL_WORDS}


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_query_reads_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    known = known_names()
    assert contract.TTFT_SECONDS in known and "kvpilot_operator_model_replicas" in known
    read = set()
    for expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = {n for n in names if n not in known and base(n) not in known}
        assert not unknown, f"{expr!r} reads {sorted(unknown)}, which nothing exports"
        read |= {base(n) if base(n) in known else n for n in names}
    # what the issue asks a viewer to see, per Model and per node
    assert {contract.TTFT_SECONDS, contract.ITL_SECONDS, "kvpilot_operator_model_kv_pressure_ratio",
            "kvpilot_operator_model_kv_pressure_target_ratio",
            "kvpilot_operator_model_desired_replicas", "kvpilot_operator_model_replicas",
            "kvpilot_operator_model_ready_replicas", "kvpilot_operator_model_ttft_target_seconds",
            "kvpilot_operator_model_itl_target_seconds", "kvpilot_operator_scaling_decisions",
            "kvpilot_operator_node_gpu_memory_allocated_bytes"} <= read


def test_the_name_check_catches_a_misspelt_metric():
    assert metric_names('sum by (model) (rate(kvpilot_ttft_seconds_bucket{model=~"$m"}[5m]))') \
        == {"kvpilot_ttft_seconds_bucket"}
    assert base("kvpilot_ttft_seconds_bucket") not in known_names()


def test_the_dashboard_is_valid_json_with_unique_panel_positions_and_refs():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    cells = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(cells) == len(set(cells))
    for p in dashboard["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


def test_the_chart_renders_the_dashboard_only_when_enabled():
    assert ("ConfigMap", "kvpilot-dashboard") not in kinds(render())
    cm = one(render({"metrics": {"dashboard": {
        "enabled": True, "labels": {"team": "ml"},
        "annotations": {"grafana_folder": "kvpilot"}}}}), "ConfigMap", "kvpilot-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "ml"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "kvpilot"}
    assert json.loads(cm["data"]["kvpilot.json"]) == json.loads(DASHBOARD.read_text())
    cm = one(render({"metrics": {"dashboard": {"enabled": True, "label": "dashboards",
                                               "labelValue": "kvpilot"}}}), "ConfigMap")
    assert cm["metadata"]["labels"]["dashboards"] == "kvpilot"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def test_node_memory_sums_the_budgets_of_the_replicas_a_node_holds():
    nodes = (Node("a", "NVIDIA-H100-80GB-HBM3", 2, 80 * GiB),
             Node("b", "NVIDIA-L40S", 1, 48 * GiB))
    held = (Existing("r1", "m", "a", (0,), 30 * GiB), Existing("r2", "m", "a", (0, 1), 20 * GiB))
    assert metrics.node_memory(nodes, held) == {"a": (160 * GiB, 70 * GiB), "b": (48 * GiB, 0)}
    metrics.observe_nodes(nodes, held)
    get = metrics.REGISTRY.get_sample_value
    assert get("kvpilot_operator_node_gpu_memory_allocated_bytes", {"node": "a"}) == 70 * GiB
    metrics.observe_nodes(nodes[:1], ())
    assert get("kvpilot_operator_node_gpu_memory_bytes", {"node": "b"}) is None  # gone
    assert get("kvpilot_operator_node_gpu_memory_allocated_bytes", {"node": "a"}) == 0


def test_a_models_targets_are_exported_and_an_unset_one_is_not():
    spec = ModelSpec.model_validate({
        "weights": {"bytes": "1Gi"},
        "architecture": {"layers": 2, "attentionHeads": 4, "kvHeads": 2, "headDim": 64,
                         "maxContextTokens": 4096},
        "sla": {"contextTokens": 4096, "concurrentSequences": 4, "ttftMilliseconds": 500},
        "maxReplicas": 3, "autoscaling": {"enabled": True, "targetKvPressurePercent": 80}})
    metrics.observe_targets("ns", "m", spec)
    get = metrics.REGISTRY.get_sample_value
    labels = {"namespace": "ns", "model": "m"}
    assert get("kvpilot_operator_model_ttft_target_seconds", labels) == 0.5
    assert get("kvpilot_operator_model_kv_pressure_target_ratio", labels) == 0.8
    assert get("kvpilot_operator_model_itl_target_seconds", labels) is None
    metrics.forget("ns", "m")
    assert get("kvpilot_operator_model_ttft_target_seconds", labels) is None
