"""The Model API as pydantic sees it: defaults, aliases and the cross-field rules."""

from __future__ import annotations

from fractions import Fraction

import pytest
from pydantic import ValidationError

from kvpilot.api.files import one_line
from kvpilot.api.model import Model, ModelSpec
from kvpilot.api.quantity import format_bytes, parse_bytes, parse_quantity
from tests.conftest import llama_spec
from tests.invalid_models import INVALID, VALID, document


def test_defaults_and_camel_case_names():
    spec = ModelSpec.model_validate(llama_spec())
    assert spec.replicas == 1 and spec.min_replicas == 1 and spec.max_replicas is None
    assert spec.tensor_parallel == "auto"
    assert spec.kv_cache_dtype == "bf16"
    assert spec.autoscaling.target_kv_pressure_percent == 75
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["architecture"]["kvHeads"] == 8
    assert dumped["sla"]["concurrentSequences"] == 16


def test_examples_load(example_docs):
    assert len(example_docs) >= 4
    for name, doc in example_docs.items():
        model = Model.model_validate(doc)
        assert model.metadata.name, name


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in INVALID])
def test_invalid_models_name_the_field_and_fix(case):
    with pytest.raises(ValidationError) as err:
        Model.model_validate(document(case, llama_spec()))
    text = one_line(err.value)
    assert f"{case.field}: " in text and case.loader_text in text, text
    # the one error of the case, in words a user knows, not pydantic's internals
    for internal in ("constrained-", "function-", "union", "and 1 more", "Value error"):
        assert internal not in text, text


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in VALID])
def test_edge_models_are_accepted(case):
    model = Model.model_validate(document(case, llama_spec()))
    assert model.metadata.name == document(case, {})["metadata"]["name"]


def test_unknown_fields_are_refused():
    # a typo is refused, not silently dropped
    with pytest.raises(ValidationError, match="replica"):
        ModelSpec.model_validate(llama_spec(replica=2))


def test_tp_multiple_of_kv_heads_is_allowed():
    spec = llama_spec(
        architecture={"layers": 32, "attentionHeads": 32, "kvHeads": 1, "headDim": 128,
                      "maxContextTokens": 8192},
        tensorParallel=4,
    )
    assert ModelSpec.model_validate(spec).tensor_parallel == 4


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096), ("4096", 4096), ("16Gi", 16 * 2**30), ("1.5Gi", 3 * 2**29),
        ("8G", 8 * 10**9), ("500Mi", 500 * 2**20), ("1e3", 1000), ("0.5", 1),
        ("1.6e10", 16 * 10**9), ("1Pi", 2**50), (2**50, 2**50), ("1.125P", 1125 * 10**12),
        ("0.001E", 10**15), ("0." + "9" * 20 + "Pi", 2**50), (".5Ki", 512),
        ("0." + "0" * 19 + "1Ki", 1),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["-1", "16GB", "1.5gi", "", "Gi", True, "1E", "1Ei", "2Pi",
                                 "1e16", "1e999999", "9" * 20 + "." + "9" * 20, "1" * 21, "1." + "0" * 21, " 1",
                                 "1\n", 2**50 + 1, -1, 1.0, None])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


@pytest.mark.parametrize(
    "text, expected",
    [("500m", Fraction(1, 2)), ("1e-3", Fraction(1, 1000)), ("2", 2), (4, 4),
     ("1.5Gi", 3 * 2**29), ("100n", Fraction(1, 10**7)), ("1E", 10**18)],
)
def test_parse_quantity_is_exact(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["-1", "+1", "1e999", "4GB", "", True, 2**63, "1 "])
def test_parse_quantity_refuses(bad):
    with pytest.raises(ValueError):
        parse_quantity(bad)


def test_format_bytes():
    assert format_bytes(65755949056) == "61.2 GiB"
    assert format_bytes(1536 * 2**20) == "1.5 GiB"
    assert format_bytes(512) == "512 B"
