"""The generated CRD: fresh, structural, and carrying the rules of the pydantic models."""

from __future__ import annotations

from typing import Any

import yaml

from kvpilot.api import crd
from kvpilot.api.model import ModelSpec
from tests.conftest import ROOT


def walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_crds_directories_are_fresh():
    dirs = [str(ROOT / d) for d in crd.DEFAULT_OUTDIRS]
    assert crd.main(["--check", *dirs]) == 0, "run: python -m kvpilot.api.crd"


def test_check_detects_staleness(tmp_path):
    assert crd.main(["--check", str(tmp_path)]) == 1
    assert crd.main([str(tmp_path)]) == 0
    assert crd.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "models.kvpilot.dev.yaml").write_text("stale")
    assert crd.main(["--check", str(tmp_path)]) == 1
    assert crd.main([str(tmp_path)]) == 0
    (tmp_path / "leftover.yaml").write_text("kind: CustomResourceDefinition")
    assert crd.main(["--check", str(tmp_path)]) == 1


def test_schema_is_structural():
    doc = yaml.safe_load((ROOT / "crds" / "models.kvpilot.dev.yaml").read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node, path
        assert "anyOf" not in node and "oneOf" not in node, path
        assert "title" not in node, path
        if "properties" in node:
            assert "additionalProperties" not in node, path
            assert node.get("type") == "object", path
        is_schema = any(k in node for k in ("type", "x-kubernetes-int-or-string"))
        if path.endswith(tuple(f".{k}" for k in ("items", "additionalProperties"))):
            assert is_schema, path


def test_rules_reach_the_crd():
    doc = crd.model_crd()
    spec_schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["message"] for v in spec_schema["x-kubernetes-validations"]]
    assert rules == [r.message for r in ModelSpec.RULES]
    tp = spec_schema["properties"]["tensorParallel"]
    assert tp["x-kubernetes-int-or-string"] and tp["default"] == "auto"
    assert spec_schema["properties"]["autoscaling"]["default"] == {}


def test_subresources_and_columns():
    version = crd.model_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Replicas", "Ready", "TP", "HBM/GPU", "KV%", "Reason", "Endpoint", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        field = column["jsonPath"].split(".")[-1]
        if column["jsonPath"].startswith(".status."):
            assert field in status, column


def test_placement_spread_has_its_default_but_placement_is_not_filled_in():
    # The API server fills in spread: node where placement is given; placement itself
    # stays absent on Models that do not state it, so their spec (and the hash their
    # pods carry) does not change when the operator is upgraded.
    spec_schema = crd.model_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    placement = spec_schema["properties"]["placement"]
    assert "default" not in placement
    spread = placement["properties"]["spread"]
    assert spread["enum"] == ["gpu", "node", "none"] and spread["default"] == "node"
    assert spread["description"].endswith("Default: node.")
