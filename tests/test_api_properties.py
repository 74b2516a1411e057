"""Random Model documents through the loader and the planner: the only exception is the
loader's FileError, and whatever it accepts plans (table and JSON) without one."""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpilot.api.files import FileError, models_from_documents, parse_documents
from kvpilot.api.fleet import load_fleet
from kvpilot.api.support import worker_support_problem
from kvpilot.cli import model_summary, render_table
from kvpilot.operator.placement import Policy, demands_from_models, place, snapshot_from_fleet
from tests.conftest import EXAMPLES

SNAPSHOT = snapshot_from_fleet(load_fleet(EXAMPLES / "fleets" / "mixed.yaml").expand())

# Values at and around every bound the API has, and of every JSON type.
ODD = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 8, 16, 96, 1024, 1025, 10_000, 65_536, 2**48, 2**50,
                     2**50 + 1, 2**63, 10**30, True, False, None, 1.5, float("inf"), "",
                     "auto", "2", "1Pi", "2Pi", "1e99", "9" * 20 + "e99", "500m", "-1Gi",
                     "16Gi", "1.5", "\x00", "Model", [], {}, [1], {"a": 1}]),
    st.integers(), st.text(max_size=40), st.floats(allow_nan=True),
)

QUANTITY = st.one_of(
    st.integers(min_value=0, max_value=2**51),
    st.builds(lambda n, f, s: f"{n}{f}{s}", st.integers(0, 10**6),
              st.sampled_from(["", ".5", ".", ".25"]),
              st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P",
                               "E", "e3", "e9", "e15", "e99", "m"])),
)


@st.composite
def architectures(draw) -> dict[str, Any]:
    kv = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 3, 6]))
    group = draw(st.sampled_from([1, 2, 4, 7, 8]))
    return {"layers": draw(st.integers(1, 1024)), "attentionHeads": kv * group,
            "kvHeads": kv, "headDim": 8 * draw(st.integers(1, 128)),
            "maxContextTokens": draw(st.integers(1, 16_777_216))}


@st.composite
def specs(draw) -> dict[str, Any]:
    arch = draw(architectures())
    replicas = draw(st.integers(0, 12))
    spec: dict[str, Any] = {
        "weights": draw(st.one_of(
            st.fixed_dictionaries({"parameters": st.integers(1, 2**48),
                                   "dtype": st.sampled_from(["fp32", "bf16", "fp8", "int4"])}),
            st.fixed_dictionaries({"bytes": QUANTITY}))),
        "architecture": arch,
        "kvCacheDtype": draw(st.sampled_from(["bf16", "fp16", "fp8"])),
        "sla": {"contextTokens": draw(st.integers(1, arch["maxContextTokens"])),
                "concurrentSequences": draw(st.integers(1, 65_536))},
        "replicas": replicas, "minReplicas": draw(st.integers(0, replicas)),
        "tensorParallel": draw(st.sampled_from(["auto", 1, 2, 4, 8, 16])),
        "runtimeOverhead": draw(QUANTITY),
        "gpuProducts": draw(st.lists(st.sampled_from(
            ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L4", "NVIDIA-H200", "X"]), max_size=3,
            unique=True)),
    }
    return spec


def _set(doc: dict, path: list[str], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is None and path[-1] in node and len(path) > 1:
        del node[path[-1]]
    else:
        node[path[-1]] = value


PATHS = [p.split(".") for p in (
    "spec.weights.parameters", "spec.weights.bytes", "spec.weights.dtype",
    "spec.architecture.layers", "spec.architecture.kvHeads", "spec.architecture.headDim",
    "spec.architecture.attentionHeads", "spec.sla.contextTokens",
    "spec.sla.concurrentSequences", "spec.replicas", "spec.maxReplicas",
    "spec.tensorParallel", "spec.runtimeOverhead", "spec.gpuProducts",
    "spec.autoscaling.enabled", "spec.worker.image", "spec.worker.engineArgs",
    "spec.worker.resources.requests.cpu", "spec.worker.resources.limits.example.com/dev",
    "metadata.name", "metadata", "spec", "kind", "apiVersion", "spec.unknown",
)]


@st.composite
def documents(draw) -> dict[str, Any]:
    name = draw(st.one_of(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?", fullmatch=True),
                          st.text(max_size=60)))
    doc = {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
           "metadata": {"name": name}, "spec": draw(specs())}
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), ODD), max_size=3)):
        _set(doc, path, value)
    return doc


def _plan(models) -> None:
    policy = Policy.pack(reserve=0.1)
    demands, refused = demands_from_models(models, SNAPSHOT, policy)
    plan = place(SNAPSHOT, demands, policy)
    table = render_table(plan, demands, refused)
    assert max(map(len, table.splitlines())) <= 100, table
    json.dumps({**plan.to_dict(), "models": model_summary(plan, demands, refused)})
    assert {name: r.reason for name, r in refused.items()} == {
        m.metadata.name: worker_support_problem(m.spec) for m in models
        if worker_support_problem(m.spec)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(documents(), min_size=1, max_size=3))
def test_random_documents_load_or_fail_cleanly_and_plan(docs):
    try:
        models = models_from_documents(docs, "m.yaml")
    except FileError as err:
        assert str(err).startswith("m.yaml") and "\n" not in str(err)
        return
    if len({m.metadata.name for m in models}) < len(models):
        return  # the planner refuses a name twice, as the API server would
    _plan(models)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_yaml_text_loads_as_the_document_does(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    try:
        direct = models_from_documents([doc], "m.yaml")
    except FileError as err:
        direct = str(err)
    try:
        loaded = models_from_documents(parse_documents(text, "m.yaml"), "m.yaml")
    except FileError as err:
        loaded = str(err)
    assert loaded == direct
