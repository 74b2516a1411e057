"""An InferencePool per Model (Gateway API Inference Extension): the pure builder, the
drift patch, whether the cluster serves the CRD, and the passes that make and mend the
pools, with exact expectations."""

from __future__ import annotations

import copy
import logging

import pytest

from kvpilot.operator.objects import (
    EndpointPicker, inference_pool_for, inference_pool_patch, owner_reference, service_for,
)
from kvpilot.operator.reconcile import Config, Patch, reconcile
from kvpilot.operator.runner import Fleet, Indexes
from kvpilot.operator.settings import Settings
from kvpilot.operator.view import cluster_view, inference_pool_served, signature, trimmed

from tests.operator_helpers import NOW, model, node

SERVING = {"app.kubernetes.io/managed-by": "kvpilot", "kvpilot.dev/model": "llama",
           "app.kubernetes.io/component": "worker", "kvpilot.dev/serving": "true"}
POOL = {
    "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
    "metadata": {"name": "llama", "namespace": "ml",
                 "labels": {"app.kubernetes.io/managed-by": "kvpilot",
                            "kvpilot.dev/model": "llama"},
                 "ownerReferences": [owner_reference("llama", "uid-1")]},
    "spec": {"selector": {"matchLabels": SERVING},
             "targetPorts": [{"number": 8000}],
             "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002},
                                   "failureMode": "FailClose"}},
}


def stored(pool: dict) -> dict:
    """``pool`` as the API server returns it: the CRD's defaults filled in, a status."""
    out = copy.deepcopy(pool)
    out["spec"]["appProtocol"] = "http"
    if "endpointPickerRef" in out["spec"]:
        out["spec"]["endpointPickerRef"].update(group="", kind="Service")
    out["status"] = {"parents": []}
    out["metadata"].update(uid="pool-uid", resourceVersion="7")
    return out


# -- the builder ----------------------------------------------------------------------------

def test_the_pool_selects_what_the_service_selects_on_the_workers_port():
    assert inference_pool_for("llama", "ml", "uid-1", 8000) == POOL
    assert POOL["spec"]["selector"]["matchLabels"] == service_for(
        "llama", "ml", "uid-1")["spec"]["selector"]


def test_the_picker_is_named_per_model_and_can_be_left_out():
    picker = EndpointPicker("gie-{model}-picker", 9100, "FailOpen")
    assert inference_pool_for("qwen", "ml", "u", 9000, picker)["spec"] == {
        "selector": {"matchLabels": {**SERVING, "kvpilot.dev/model": "qwen"}},
        "targetPorts": [{"number": 9000}],
        "endpointPickerRef": {"name": "gie-qwen-picker", "port": {"number": 9100},
                              "failureMode": "FailOpen"}}
    shared = inference_pool_for("qwen", "ml", "u", 9000, EndpointPicker("fleet-epp"))
    assert shared["spec"]["endpointPickerRef"]["name"] == "fleet-epp"
    bare = inference_pool_for("qwen", "ml", "u", 9000, EndpointPicker(""))
    assert set(bare["spec"]) == {"selector", "targetPorts"}


# -- drift ----------------------------------------------------------------------------------

def test_a_pool_as_stored_with_the_crds_defaults_needs_no_patch():
    assert inference_pool_patch(POOL, stored(POOL)) is None


def test_drift_is_patched_back_and_nothing_else_is_touched():
    s = stored(POOL)
    s["spec"]["targetPorts"] = [{"number": 9999}]
    s["spec"]["selector"]["matchLabels"]["team"] = "a"
    s["spec"]["appProtocol"] = "kubernetes.io/h2c"  # someone's choice: left alone
    assert inference_pool_patch(POOL, s) == {"spec": {
        "selector": {"matchLabels": {"team": None, **SERVING}},
        "targetPorts": [{"number": 8000}]}}


def test_a_new_picker_is_patched_in_and_a_dropped_one_out():
    s = stored(POOL)
    moved = inference_pool_for("llama", "ml", "uid-1", 8000, EndpointPicker(port=9003))
    assert inference_pool_patch(moved, s) == {"spec": {"endpointPickerRef": {
        "name": "llama-epp", "port": {"number": 9003}, "failureMode": "FailClose"}}}
    bare = inference_pool_for("llama", "ml", "uid-1", 8000, EndpointPicker(""))
    assert inference_pool_patch(bare, s) == {"spec": {"endpointPickerRef": None}}
    assert inference_pool_patch(bare, stored(bare)) is None


# -- is the CRD served -----------------------------------------------------------------------

def crd(name: str = "inferencepools.inference.networking.k8s.io",
        versions: tuple[tuple[str, bool], ...] = (("v1", True),),
        established: str = "True", deleting: bool = False) -> dict:
    meta = {"name": name, "uid": "crd-uid", "resourceVersion": "3",
            "annotations": {"inference.networking.k8s.io/bundle-version": "v1.6.2"}}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": meta,
            "spec": {"group": name.split(".", 1)[1], "versions": [
                {"name": v, "served": served, "storage": True,
                 "schema": {"openAPIV3Schema": {"type": "object"}}}
                for v, served in versions]},
            "status": {"conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                {"type": "Established", "status": established, "reason": "InitialNames"}]}}


@pytest.mark.parametrize("crds, served", [
    ([crd()], True),
    ([crd("models.kvpilot.dev"), crd()], True),
    ([], False),
    ([crd(established="False")], False),  # just created: not served yet
    ([crd(deleting=True)], False),
    ([crd(versions=(("v1", False),))], False),
    ([crd(versions=(("v1alpha2", True),))], False),
    # the pre-GA pools of another group: kvpilot writes only the v1 ones
    ([crd("inferencepools.inference.networking.x-k8s.io",
          versions=(("v1alpha2", True),))], False),
])
def test_pools_are_made_only_where_the_v1_crd_is_established(crds, served):
    assert inference_pool_served(crds) is served
    assert inference_pool_served([trimmed("CustomResourceDefinition", c)
                                  for c in crds]) is served


def test_the_index_keeps_of_a_crd_only_what_says_what_it_serves():
    assert trimmed("CustomResourceDefinition", crd()) == {
        "metadata": {"name": "inferencepools.inference.networking.k8s.io"},
        "spec": {"versions": [{"name": "v1", "served": True}]},
        "status": {"conditions": [{"type": "NamesAccepted", "status": "True"},
                                  {"type": "Established", "status": "True"}]}}


def test_a_gateway_writing_a_pools_status_does_not_wake_the_fleet_loop():
    s = stored(POOL)
    with_parent = copy.deepcopy(s)
    with_parent["status"] = {"parents": [{"parentRef": {"name": "gw"}}]}
    with_parent["metadata"]["resourceVersion"] = "8"
    assert signature("InferencePool", s) == signature("InferencePool", with_parent)
    edited = copy.deepcopy(s)
    edited["spec"]["targetPorts"] = [{"number": 1}]
    assert signature("InferencePool", s) != signature("InferencePool", edited)


# -- passes -----------------------------------------------------------------------------------

def run(models: list[dict], pools: dict | None, services: dict | None = None,
        config: Config = Config(mode="devicePlugin")):
    """One pass over a cluster of one node, with these pools (None: not served) and
    Services (default: every Model's)."""
    if services is None:
        services = {m["metadata"]["name"]: service_for(m["metadata"]["name"],
                                                       m["metadata"]["namespace"], "")
                    for m in models}
    view = cluster_view([node("a")], [], [], [], "devicePlugin",
                        services=list(services.values()),
                        pools=None if pools is None else list(pools.values()))
    return reconcile(models, view, config, NOW)


def pools_made(actions) -> list[dict]:
    return [o for o in actions.creates if o["kind"] == "InferencePool"]


def test_without_the_crd_no_pool_is_made():
    assert pools_made(run([model("m", 1)], None)) == []


def test_every_model_gets_a_pool_once_and_then_no_write():
    m, n = model("m", 1), model("n", 0, ns="other")
    made = pools_made(run([m, n], {}))
    assert made == [inference_pool_for("m", "default", "uid-m", 8000),
                    inference_pool_for("n", "other", "uid-n", 8000)]
    pools = {p["metadata"]["name"]: stored(p) for p in made}
    again = run([m, n], pools)
    assert pools_made(again) == [] and again.patches == []


def test_the_pool_follows_the_settings_port_and_picker():
    m = model("m", 1)
    pools = {"m": stored(inference_pool_for("m", "default", "", 8000))}
    config = Config(mode="devicePlugin", worker_port=8080,
                    picker=EndpointPicker("{model}-picker", 9002, "FailOpen"))
    actions = run([m], pools, config=config)
    assert pools_made(actions) == []
    assert actions.patches == [Patch("InferencePool", "default", "m", {"spec": {
        "targetPorts": [{"number": 8080}],
        "endpointPickerRef": {"name": "m-picker", "port": {"number": 9002},
                              "failureMode": "FailOpen"}}})]


def test_a_deleting_model_or_pool_gets_no_pool_write():
    going = model("m", 1)
    going["metadata"]["deletionTimestamp"] = NOW
    assert pools_made(run([going], {})) == []
    pool = stored(inference_pool_for("m", "default", "", 9000))  # drifted, and going
    pool["metadata"]["deletionTimestamp"] = NOW
    actions = run([model("m", 1)], {"m": pool})
    assert pools_made(actions) == [] and actions.patches == []


def test_a_pool_not_labelled_as_kvpilots_is_not_taken_for_the_models():
    other = stored(inference_pool_for("m", "default", "", 8000))
    other["metadata"]["labels"] = {"app": "someone-else"}
    assert [p["metadata"]["name"] for p in pools_made(run([model("m", 1)], {"m": other}))
            ] == ["m"]  # the create answers 409, logged; the pool is not patched


# -- the fleet loop's switch ------------------------------------------------------------------

@pytest.mark.parametrize("mode, crds, wanted, level", [
    ("auto", [crd()], True, logging.INFO),
    ("auto", [], False, logging.INFO),
    ("true", [], False, logging.WARNING),
    ("false", [crd()], False, None),
])
def test_pools_are_wanted_as_the_settings_and_the_crd_say_and_said_once(
        mode, crds, wanted, level, caplog):
    fleet = Fleet(None, Settings(inference_pool=mode), Indexes())  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="kvpilot.fleet"):
        assert fleet.pools_wanted(crds) is wanted
        assert fleet.pools_wanted(crds) is wanted
    assert [r.levelno for r in caplog.records] == ([] if level is None else [level])


def test_settings_reach_the_passes_config():
    settings = Settings.from_env({"KVPILOT_WORKER_PORT": "9000",
                                  "KVPILOT_ENDPOINT_PICKER": "{model}-gie",
                                  "KVPILOT_ENDPOINT_PICKER_PORT": "9100",
                                  "KVPILOT_ENDPOINT_PICKER_FAILURE_MODE": "FailOpen"})
    config = Fleet(None, settings, Indexes()).config("dra")  # type: ignore[arg-type]
    assert (config.worker_port, config.picker) == (
        9000, EndpointPicker("{model}-gie", 9100, "FailOpen"))


@pytest.mark.parametrize("env, message", [
    ({"KVPILOT_INFERENCE_POOL": "yes"}, "KVPILOT_INFERENCE_POOL"),
    ({"KVPILOT_ENDPOINT_PICKER": "EPP_{model}"}, "KVPILOT_ENDPOINT_PICKER"),
    ({"KVPILOT_ENDPOINT_PICKER_FAILURE_MODE": "failopen"},
     "KVPILOT_ENDPOINT_PICKER_FAILURE_MODE"),
])
def test_bad_pool_settings_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)
