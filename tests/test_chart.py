"""The Helm chart as rendered by helm: objects, RBAC, the operator's settings, the schema.

What the API server makes of the objects, and the RBAC against the operator's real
calls, is e2e/test_helm.py's part.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from kvpilot.api import crd
from kvpilot.operator import objects as builders
from kvpilot.operator.settings import Settings
from tests.chart_helpers import (
    ALL_FEATURES, CHART, NAMESPACE, container_env, grants, helm, kinds, one, render,
    template,
)

OPERATOR = "kvpilot-operator"
METRICS_SERVICE = f"{OPERATOR}-metrics"
ROUTER = "kvpilot-router"
POD = "kvpilot-operator-5d9c7b-x2x7q"


def test_lint_is_clean_with_defaults_and_with_every_feature(tmp_path):
    values = tmp_path / "all.yaml"
    values.write_text(yaml.safe_dump(ALL_FEATURES))
    for args in ([], ["-f", str(values)]):
        out = helm("lint", "--strict", str(CHART), *args).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out, out
        assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_defaults_render_the_operator_the_router_and_their_rbac():
    assert kinds(render()) == [
        ("ClusterRole", "kvpilot-models-edit"),
        ("ClusterRole", "kvpilot-models-view"),
        ("ClusterRole", OPERATOR),
        ("ClusterRole", ROUTER),
        ("ClusterRoleBinding", OPERATOR),
        ("ClusterRoleBinding", ROUTER),
        ("CustomResourceDefinition", "models.kvpilot.dev"),
        ("Deployment", OPERATOR),
        ("Deployment", ROUTER),
        ("Role", OPERATOR),
        ("RoleBinding", OPERATOR),
        ("Service", METRICS_SERVICE),
        ("Service", ROUTER),
        ("ServiceAccount", "kvpilot"),
        ("ServiceAccount", ROUTER),
    ]


def test_every_optional_feature_renders_its_object():
    objs = render(ALL_FEATURES)
    extra = set(kinds(objs)) - set(kinds(render()))
    assert extra == {("NetworkPolicy", OPERATOR), ("PodDisruptionBudget", OPERATOR),
                     ("PodMonitor", "kvpilot-workers"), ("ServiceMonitor", OPERATOR),
                     ("ConfigMap", "kvpilot-dashboard")}
    assert one(objs, "Deployment", OPERATOR)["spec"]["replicas"] == 2


# -- the CRD ------------------------------------------------------------------------------

def test_the_crd_is_the_generated_one_with_the_release_labels_and_kept_on_uninstall():
    rendered = one(render(), "CustomResourceDefinition")
    meta = rendered["metadata"]
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert meta["labels"]["app.kubernetes.io/instance"] == "kvpilot"
    generated = crd.model_crd()
    rendered["metadata"] = {k: v for k, v in meta.items() if k not in ("labels", "annotations")}
    assert rendered == generated


def test_crds_can_be_left_to_the_cluster_admin_or_deleted_with_the_release():
    assert "CustomResourceDefinition" not in {o["kind"] for o in render({"crds": {"install": False}})}
    meta = one(render({"crds": {"keep": False}}), "CustomResourceDefinition")["metadata"]
    assert "annotations" not in meta


def test_the_chart_carries_no_crds_directory_that_helm_would_install_but_never_upgrade():
    assert not (CHART / "crds").exists()
    assert sorted(p.name for p in (CHART / "files" / "crds").iterdir()) == sorted(crd.render())


# -- RBAC ---------------------------------------------------------------------------------

WATCH = {"list", "watch"}
CLUSTER_RULES = {  # (group, resource) -> verbs: exactly the operator's calls
    ("kvpilot.dev", "models"): WATCH | {"patch"},
    ("kvpilot.dev", "models/status"): {"patch"},
    ("kvpilot.dev", "models/scale"): {"patch"},
    ("", "pods"): WATCH | {"create", "patch", "delete"},
    ("", "services"): WATCH | {"create"},
    ("resource.k8s.io", "resourceclaims"): WATCH | {"create", "delete"},
    ("resource.k8s.io", "resourceslices"): WATCH,
    ("", "nodes"): WATCH,
    ("", "events"): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): WATCH,
    ("inference.networking.k8s.io", "inferencepools"): WATCH | {"create", "patch"},
}


def test_the_operator_gets_exactly_the_calls_it_makes():
    objs = render()
    cluster = grants(one(objs, "ClusterRole", OPERATOR)["rules"])
    assert cluster == {(g, r, ()): v for (g, r), v in CLUSTER_RULES.items()}
    lease = grants(one(objs, "Role", OPERATOR)["rules"])
    # create cannot be limited to a name; reading and renewing are, to the one Lease
    assert lease == {("coordination.k8s.io", "leases", ()): {"create"},
                     ("coordination.k8s.io", "leases", (OPERATOR,)): {"get", "update"}}
    role = one(objs, "Role", OPERATOR)
    assert role["metadata"]["namespace"] == NAMESPACE
    for binding, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        b = one(objs, binding, OPERATOR)
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                "name": OPERATOR}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kvpilot",
                                  "namespace": NAMESPACE}]
    deployment = one(objs, "Deployment", OPERATOR)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kvpilot"


def test_inference_pools_turned_off_take_their_grants_with_them():
    objs = render({"inferencePool": {"enabled": False}})
    cluster = grants(one(objs, "ClusterRole", OPERATOR)["rules"])
    assert cluster == {(g, r, ()): v for (g, r), v in CLUSTER_RULES.items()
                       if g != "inference.networking.k8s.io"}
    env = container_env(one(objs, "Deployment", OPERATOR), POD)
    assert Settings.from_env(env).inference_pool == "false"
    on = render({"inferencePool": {"enabled": True}})
    assert Settings.from_env(container_env(one(on, "Deployment", OPERATOR), POD)
                             ).inference_pool == "true"
    assert one(on, "ClusterRole", OPERATOR)["rules"] == one(
        render(), "ClusterRole", OPERATOR)["rules"]


def test_no_role_in_the_chart_grants_wildcards_or_secrets():
    for o in render(ALL_FEATURES):
        for rule in o.get("rules", []) if o["kind"] in ("ClusterRole", "Role") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (o["metadata"]["name"], rule)
            assert not {"secrets", "configmaps"} & set(rule["resources"]), rule


def test_namespace_users_get_models_through_the_default_roles():
    objs = render()
    view = one(objs, "ClusterRole", "kvpilot-models-view")
    edit = one(objs, "ClusterRole", "kvpilot-models-edit")
    assert {k for k, v in view["metadata"]["labels"].items()
            if k.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"} == {
        "rbac.authorization.k8s.io/aggregate-to-view",
        "rbac.authorization.k8s.io/aggregate-to-edit",
        "rbac.authorization.k8s.io/aggregate-to-admin"}
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert grants(view["rules"]) == {("kvpilot.dev", r, ()): {"get", "list", "watch"}
                                     for r in ("models", "models/status", "models/scale")}
    assert "ClusterRole" not in {o["kind"] for o in render(
        {"rbac": {"aggregateToDefaultRoles": False}}) if o["metadata"]["name"].endswith(
        ("-view", "-edit"))}


# -- the operator's Deployment and settings -------------------------------------------------

def test_the_operator_runs_locked_down():
    pod = one(render(), "Deployment", OPERATOR)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532,
                                      "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                    "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["args"] == ["operator"]
    strategy = one(render(), "Deployment", OPERATOR)["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert c["image"] == "kvpilot/operator:0.1.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080,
                                                                   "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    # the one writable path, for Python's temporary files
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


def test_the_default_env_is_valid_settings_and_sets_every_one():
    env = container_env(one(render(), "Deployment", OPERATOR), POD)
    settings = Settings.from_env(env)
    # every setting comes from the chart, so none falls back to a default it never chose
    assert {k.removeprefix("KVPILOT_").lower() for k in env} == set(Settings.model_fields)
    assert settings == Settings(
        mode="auto", dra_driver="gpu.nvidia.com", device_class="gpu.nvidia.com",
        reserve=0, packing=1, not_ready_grace_seconds=60, reserved_pods_per_node=10,
        worker_image="kvpilot/worker:0.1.0", worker_port=8000,
        worker_command=("python", "-m", "kvpilot.worker"), scrape_seconds=15,
        scrape_timeout_seconds=2, drain_timeout_seconds=120, scale_up_headroom_seconds=60,
        demand_trend_seconds=60, latency_miss_budget=0.01,
        weights_cache_dir="/var/cache/kvpilot/models", hub_endpoint="", reconcile_seconds=30,
        debounce_seconds=0.2, write_concurrency=16, namespace=NAMESPACE,
        lease_name=OPERATOR, lease_seconds=15, identity=POD, metrics_port=8080,
        health_port=8081, inference_pool="auto", endpoint_picker="{model}-epp",
        endpoint_picker_port=9002, endpoint_picker_failure_mode="FailClose")


CHANGED = {
    "placement": {"mode": "devicePlugin", "draDriver": "gpu.example.com",
                  "deviceClass": "h100.example.com", "reserve": 0.1, "packing": 0,
                  "notReadyGraceSeconds": 300, "reservedPodsPerNode": 4},
    "worker": {"image": {"repository": "registry.example.com/ml/kvpilot-worker",
                         "tag": "0.1.0-cu13", "digest": "sha256:" + "ab" * 32},
               "port": 9000, "command": ["/opt/kvpilot/bin/python", "-m", "kvpilot.worker"],
               "scrapeSeconds": 5, "scrapeTimeoutSeconds": 1.5, "drainTimeoutSeconds": 600,
               "weightsCache": {"enabled": False, "hostPath": "/data/models"},
               "hubEndpoint": "http://hub-mirror.ml.svc:8080"},
    "autoscaling": {"scaleUpHeadroomSeconds": 120, "demandTrendSeconds": 90,
                    "latencyMissBudget": 0.05},
    "operator": {"reconcileSeconds": 10, "debounceSeconds": 0, "writeConcurrency": 4,
                 "leaseSeconds": 30, "metricsPort": 9090, "healthPort": 9091, "verbose": True},
    "inferencePool": {"enabled": True, "endpointPicker": {
        "name": "gie-{model}", "port": 9100, "failureMode": "FailOpen"}},
}


def test_values_flow_into_the_operators_settings():
    objs = render(CHANGED)
    deployment = one(objs, "Deployment", OPERATOR)
    settings = Settings.from_env(container_env(deployment, POD))
    assert settings.model_dump(exclude={"namespace", "lease_name", "identity"}) == dict(
        mode="devicePlugin", dra_driver="gpu.example.com", device_class="h100.example.com",
        reserve=0.1, packing=0, not_ready_grace_seconds=300, reserved_pods_per_node=4,
        worker_image="registry.example.com/ml/kvpilot-worker:0.1.0-cu13@sha256:" + "ab" * 32,
        worker_port=9000, worker_command=("/opt/kvpilot/bin/python", "-m", "kvpilot.worker"),
        scrape_seconds=5, scrape_timeout_seconds=1.5, drain_timeout_seconds=600,
        scale_up_headroom_seconds=120, demand_trend_seconds=90, latency_miss_budget=0.05,
        weights_cache_dir="", hub_endpoint="http://hub-mirror.ml.svc:8080", reconcile_seconds=10, debounce_seconds=0, write_concurrency=4, lease_seconds=30,
        metrics_port=9090, health_port=9091, inference_pool="true",
        endpoint_picker="gie-{model}", endpoint_picker_port=9100,
        endpoint_picker_failure_mode="FailOpen")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["operator", "--verbose"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090,
                                                                   "health": 9091}
    service = one(objs, "Service", METRICS_SERVICE)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090,
                                         "targetPort": "metrics", "protocol": "TCP"}]


# Values that are the operator's settings, and the Settings field each one becomes.
SETTINGS_OF_VALUES = {
    ("placement", "mode"): "mode", ("placement", "draDriver"): "dra_driver",
    ("placement", "deviceClass"): "device_class", ("placement", "reserve"): "reserve",
    ("placement", "packing"): "packing",
    ("placement", "notReadyGraceSeconds"): "not_ready_grace_seconds",
    ("placement", "reservedPodsPerNode"): "reserved_pods_per_node",
    ("worker", "port"): "worker_port",
    ("worker", "command"): "worker_command", ("worker", "scrapeSeconds"): "scrape_seconds",
    ("worker", "scrapeTimeoutSeconds"): "scrape_timeout_seconds",
    ("worker", "drainTimeoutSeconds"): "drain_timeout_seconds",
    ("worker", "hubEndpoint"): "hub_endpoint",
    ("autoscaling", "scaleUpHeadroomSeconds"): "scale_up_headroom_seconds",
    ("autoscaling", "demandTrendSeconds"): "demand_trend_seconds",
    ("autoscaling", "latencyMissBudget"): "latency_miss_budget",
    ("operator", "reconcileSeconds"): "reconcile_seconds",
    ("operator", "debounceSeconds"): "debounce_seconds",
    ("operator", "writeConcurrency"): "write_concurrency",
    ("operator", "leaseSeconds"): "lease_seconds",
    ("operator", "metricsPort"): "metrics_port", ("operator", "healthPort"): "health_port",
    ("inferencePool", "endpointPicker", "name"): "endpoint_picker",
    ("inferencePool", "endpointPicker", "port"): "endpoint_picker_port",
    ("inferencePool", "endpointPicker", "failureMode"): "endpoint_picker_failure_mode",
}
BOUNDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
          "minLength", "minItems")


def test_the_values_schema_bounds_the_settings_as_the_settings_model_does():
    schema = json.loads((CHART / "values.schema.json").read_text())
    model = Settings.model_json_schema()["properties"]
    for path, field in SETTINGS_OF_VALUES.items():
        node = schema
        for key in path:
            node = node["properties"][key]
        ours = {k: v for k, v in node.items() if k in BOUNDS}
        theirs = {k: v for k, v in model[field].items() if k in BOUNDS}
        if field in ("metrics_port", "health_port"):
            theirs["minimum"] = 1  # 0 turns the endpoint off; the chart always serves it
        assert ours == theirs, path


@pytest.mark.parametrize("values, message", [
    ({"operator": {"replica": 2}}, "at '/operator': additional properties 'replica' not allowed"),
    ({"extra": True}, "additional properties 'extra' not allowed"),
    ({"placement": {"mode": "mig"}},
     "at '/placement/mode': value must be one of 'auto', 'dra', 'devicePlugin'"),
    ({"worker": {"scrapeSeconds": 0}}, "at '/worker/scrapeSeconds': exclusiveMinimum"),
    ({"placement": {"reserve": 1}}, "at '/placement/reserve': exclusiveMaximum"),
    ({"operator": {"replicas": 0}}, "at '/operator/replicas': minimum: got 0, want 1"),
    ({"worker": {"command": ["python -m kvpilot.worker"]}}, "at '/worker/command/0'"),
    ({"worker": {"image": {"digest": "sha256:abc"}}}, "at '/worker/image/digest'"),
    ({"operator": {"metricsPort": "8080"}}, "at '/operator/metricsPort': got string, want integer"),
    ({"worker": {"image": {"tag": "latest"}}},
     "worker.image.tag: latest is a moving tag; pin a version or a digest"),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
     "metrics.serviceMonitor.enabled needs metrics.service.enabled"),
    ({"router": {"policy": "random"}},
     "at '/router/policy': value must be one of 'prefix', 'round-robin', 'least-load'"),
    ({"router": {"loadFactor": 0.5}}, "at '/router/loadFactor': minimum"),
    ({"router": {"kvHigh": 0}}, "at '/router/kvHigh': exclusiveMinimum"),
    ({"router": {"namespaces": ["Team_A"]}}, "at '/router/namespaces/0'"),
    ({"router": {"apiKeys": {"secretName": "Keys!"}}}, "at '/router/apiKeys/secretName'"),
    ({"router": {"image": {"tag": "latest"}}},
     "router.image.tag: latest is a moving tag; pin a version or a digest"),
    ({"router": {"serviceAccount": {"create": False}}},
     "router.serviceAccount.name is required when router.serviceAccount.create is false"),
    ({"inferencePool": {"enabled": "yes"}}, "at '/inferencePool/enabled': value must be one of"),
    ({"inferencePool": {"endpointPicker": {"name": "EPP_{model}"}}},
     "at '/inferencePool/endpointPicker/name'"),
    ({"inferencePool": {"endpointPicker": {"failureMode": "failopen"}}},
     "at '/inferencePool/endpointPicker/failureMode'"),
])
def test_values_that_break_the_schema_are_refused_with_the_path(values, message):
    proc = template(values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_every_value_has_a_comment_and_a_schema_entry():
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(node: Any, path: tuple[str, ...] = ()):
        if isinstance(node, dict) and node and path[-1:] != ("resources",) and \
                path[-1:] not in (("livenessProbe",), ("readinessProbe",)):
            for key, value in node.items():
                yield from leaves(value, path + (key,))
        else:
            yield path

    def schema_at(path: tuple[str, ...]) -> dict[str, Any]:
        node = schema
        for key in path:
            assert node.get("additionalProperties") is False, f"{path}: open schema"
            node = node["properties"][key]
        return node

    key_lines = {}
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        key_lines[tuple(k for _, k in stack)] = i
    for path in leaves(values):
        above = lines[key_lines[path] - 1].strip()
        assert above.startswith("#"), f"{'.'.join(path)} has no comment"
        node = schema_at(path)
        assert node.get("description"), f"{'.'.join(path)} has no description in the schema"
        assert "type" in node, f"{'.'.join(path)} has no type in the schema"


# -- optional objects: each selects what it is for ------------------------------------------

def pod_labels(objs: list[dict[str, Any]]) -> dict[str, str]:
    return one(objs, "Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_service_pdb_and_policy_select_the_operator_pods_and_only_them():
    objs = render(ALL_FEATURES)
    labels = pod_labels(objs)
    deployment = one(objs, "Deployment", OPERATOR)
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "kvpilot",
        "app.kubernetes.io/component": "operator"}
    for selector in (one(objs, "Service", METRICS_SERVICE)["spec"]["selector"],
                     one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert selector == deployment["spec"]["selector"]["matchLabels"]
        assert selects(selector, labels)
    # the operator is never one of its own workers
    assert labels["app.kubernetes.io/managed-by"] != builders.MANAGER
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_the_service_monitor_scrapes_the_metrics_service():
    objs = render(ALL_FEATURES)
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service", METRICS_SERVICE)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "30s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_the_pod_monitor_scrapes_the_workers_the_operator_creates():
    monitor = one(render(ALL_FEATURES), "PodMonitor")
    worker_labels = {builders.MANAGED_BY: builders.MANAGER, builders.LABEL_MODEL: "llama",
                     builders.LABEL_COMPONENT: builders.COMPONENT_WORKER}
    assert selects(monitor["spec"]["selector"]["matchLabels"], worker_labels)
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"}]


def test_the_network_policy_lets_through_scrapes_probes_the_api_server_and_workers():
    policy = one(render(ALL_FEATURES), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {"ports": [{"port": "metrics", "protocol": "TCP"}],
         "from": [{"namespaceSelector": {"matchLabels": {
             "kubernetes.io/metadata.name": "monitoring"}}}]},
        {"ports": [{"port": "health", "protocol": "TCP"}]}]
    dns, api, workers = policy["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert api == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
                   "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    assert workers == {"ports": [{"port": 8000, "protocol": "TCP"}],
                       "to": [{"namespaceSelector": {},
                               "podSelector": {"matchLabels": {
                                   builders.MANAGED_BY: builders.MANAGER}}}]}


# -- the router -----------------------------------------------------------------------------

def router_args(objs: list[dict[str, Any]]) -> list[str]:
    (c,) = one(objs, "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"]
    return c["args"]


def test_the_router_may_only_list_and_watch_endpointslices_with_its_own_account():
    objs = render()
    role = one(objs, "ClusterRole", ROUTER)
    assert grants(role["rules"]) == {("discovery.k8s.io", "endpointslices", ()): WATCH}
    binding = one(objs, "ClusterRoleBinding", ROUTER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": ROUTER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ROUTER,
                                    "namespace": NAMESPACE}]
    pod = one(objs, "Deployment", ROUTER)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == ROUTER and pod["automountServiceAccountToken"]
    # the operator's grants are not the router's, nor the other way round
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        assert one(objs, kind, OPERATOR)["subjects"][0]["name"] == "kvpilot"


def test_a_router_for_some_namespaces_gets_a_role_in_each_and_no_cluster_role():
    objs = render({"router": {"namespaces": ["team-a", "team-b"]}})
    assert ("ClusterRole", ROUTER) not in kinds(objs)
    assert ("ClusterRoleBinding", ROUTER) not in kinds(objs)
    roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == ROUTER]
    bindings = [o for o in objs if o["kind"] == "RoleBinding"
                and o["metadata"]["name"] == ROUTER]
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    for r in roles:
        assert grants(r["rules"]) == {("discovery.k8s.io", "endpointslices", ()): WATCH}
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": ROUTER,
                                  "namespace": NAMESPACE}]
    assert router_args(objs)[-2:] == ["--namespace=team-a", "--namespace=team-b"]


def test_the_router_args_are_the_routers_flags_and_values_reach_them():
    from kvpilot import cli
    from kvpilot.router.app import RouterSettings
    from kvpilot.router.main import settings_from
    from kvpilot.router.scoring import Policy

    args = cli.parser().parse_args(router_args(render()))
    assert (args.command, args.port, args.namespace, args.api_keys_file) == (
        "router", 8080, [], None)
    assert settings_from(args) == RouterSettings(policy=Policy(), attempts=3,
                                                 upstream_timeout=120, idle_timeout=120)
    assert args.shutdown_seconds == 25 and args.scrape_interval == 0.25
    changed = render({"router": {
        "port": 9000, "policy": "round-robin", "loadFactor": 2, "loadSlack": 0, "kvHigh": 0.8,
        "scrapeSeconds": 0.5, "upstreamTimeoutSeconds": 300, "idleTimeoutSeconds": 30,
        "attempts": 5, "maxBodyBytes": 33554432, "terminationGracePeriodSeconds": 120}})
    args = cli.parser().parse_args(router_args(changed))
    assert settings_from(args) == RouterSettings(
        policy=Policy(mode="round-robin", load_factor=2, slack=0, kv_high=0.8), attempts=5,
        upstream_timeout=300, idle_timeout=30, max_body_bytes=33554432)
    assert (args.port, args.scrape_interval, args.shutdown_seconds) == (9000, 0.5, 115)
    pod = one(changed, "Deployment", ROUTER)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["containers"][0]["ports"] == [{"name": "http", "containerPort": 9000,
                                              "protocol": "TCP"}]


def test_api_keys_come_from_the_mounted_secret_file_the_router_is_told_of():
    objs = render({"router": {"apiKeys": {"secretName": "router-keys", "secretKey": "tokens"}}})
    pod = one(objs, "Deployment", ROUTER)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--api-keys-file=/etc/kvpilot/api-keys/keys" in c["args"]
    assert {"name": "api-keys", "mountPath": "/etc/kvpilot/api-keys", "readOnly": True} in \
        c["volumeMounts"]
    assert {"name": "api-keys", "secret": {"secretName": "router-keys", "items": [
        {"key": "tokens", "path": "keys"}]}} in pod["volumes"]
    assert not any("api-keys" in a for a in router_args(render()))


def test_the_router_runs_locked_down_and_is_probed_on_health_and_ready():
    pod = one(render(), "Deployment", ROUTER)["spec"]["template"]["spec"]
    assert pod["securityContext"] == one(render(), "Deployment", OPERATOR)["spec"][
        "template"]["spec"]["securityContext"]
    (c,) = pod["containers"]
    assert c["image"] == "kvpilot/operator:0.1.0"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}


def test_the_router_service_selects_the_router_pods_and_only_them():
    objs = render(ALL_FEATURES)
    router_pods = one(objs, "Deployment", ROUTER)["spec"]["template"]["metadata"]["labels"]
    operator_pods = pod_labels(objs)
    service = one(objs, "Service", ROUTER)
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                         "protocol": "TCP"}]
    assert service["spec"]["type"] == "ClusterIP"
    selector = service["spec"]["selector"]
    assert selector == one(objs, "Deployment", ROUTER)["spec"]["selector"]["matchLabels"]
    assert selects(selector, router_pods) and not selects(selector, operator_pods)
    for operator_selector in (one(objs, "Service", METRICS_SERVICE)["spec"]["selector"],
                              one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                              one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert not selects(operator_selector, router_pods)
    assert router_pods["app.kubernetes.io/managed-by"] != builders.MANAGER  # not a worker


def test_the_router_can_be_left_out():
    objs = render({"router": {"enabled": False}})
    assert not [k for k in kinds(objs) if k[1] == ROUTER]
