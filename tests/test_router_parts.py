"""The router's pure parts: prompt heads and block hashes, the prefix index, request
parsing, routes from EndpointSlices, worker loads from /metrics text."""

from __future__ import annotations

import pytest

from kvpilot.api import contract
from kvpilot.router.endpoints import (
    SLICE_SELECTOR, Endpoint, ModelRoute, Routes, routes_from, static_routes,
)
from kvpilot.router.loads import LoadBoard, WorkerLoad, parse_load
from kvpilot.router.prefix import PrefixIndex, block_hashes, prompt_head
from kvpilot.router.request import BadRequest, parse
from kvpilot.router.scoring import Load
from tests.router_helpers import ep, slice_of


# -- prompt heads and block hashes --------------------------------------------------------

def test_a_completion_prompt_head_is_its_text_or_its_first_prompt():
    assert prompt_head({"prompt": "abcdef"}, 4) == "abcd"
    assert prompt_head({"prompt": ["first one", "second"]}, 100) == "first one"
    assert prompt_head({"prompt": [1, 22, 333]}, 100) == "1,22,333,"
    assert prompt_head({"prompt": [[5, 6], [7]]}, 3) == "5,6"
    for junk in ({}, {"prompt": None}, {"prompt": 7}, {"prompt": [{}]},
                 {"prompt": [1, "2"]}, {"prompt": [True]}):
        assert prompt_head(junk, 10) == ""


def test_a_chat_head_is_its_messages_roles_and_text_in_order():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                      {"type": "text", "text": "there"}]},
                         "junk", {"content": None}]}
    assert prompt_head(body, 100) == "\x1esystem\x1fBe brief.\x1euser\x1fHi there\x1e\x1f"
    assert prompt_head(body, 12) == "\x1esystem\x1fBe b"
    assert prompt_head({"messages": "nope"}, 10) == ""


def test_block_hashes_are_chained_over_full_blocks_only():
    h = block_hashes("aaaabbbbcc", 4, seed="m")
    assert len(h) == 2  # "cc" is not a full block
    assert block_hashes("aaaabbbbccccdd", 4, seed="m")[:2] == h  # a longer prompt extends it
    assert block_hashes("xxxxbbbb", 4, seed="m")[1] != h[1]  # block 1 covers block 0 too
    assert block_hashes("aaaabbbb", 4, seed="other")[0] != h[0]  # per Model
    assert block_hashes("abc", 4) == ()
    assert block_hashes("\ud800\udfff" * 4, 4)  # lone surrogates from JSON still hash


# -- the prefix index ---------------------------------------------------------------------

def test_the_index_counts_leading_blocks_sent_to_each_replica():
    idx = PrefixIndex()
    idx.record("a", [1, 2, 3])
    idx.record("b", [1, 2, 9])
    assert idx.matches([1, 2, 3, 4], ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 0}
    # Hashes are chained: one stands for its whole prefix, wherever it is asked about.
    assert idx.matches([1, 9], ["a", "b"]) == {"a": 1, "b": 2}
    assert idx.matches([5, 1], ["a", "b"]) == {"a": 0, "b": 0}  # leading blocks only
    assert idx.matches([], ["a"]) == {"a": 0}


def test_the_index_keeps_the_most_recent_replicas_of_a_block_and_the_newest_blocks():
    idx = PrefixIndex(capacity=3, per_block=2)
    for name in ("a", "b", "c"):
        idx.record(name, [1])
    assert idx.matches([1], ["a", "b", "c"]) == {"a": 0, "b": 1, "c": 1}
    idx.record("b", [1])  # already the newest holders: kept
    idx.record("x", [2, 3, 4])  # hash 1 is the least recently routed: gone
    assert len(idx) == 3
    assert idx.matches([1], ["b", "c"]) == {"b": 0, "c": 0}
    assert idx.matches([2, 3, 4], ["x"]) == {"x": 3}
    with pytest.raises(ValueError):
        PrefixIndex(capacity=0)


# -- request bodies ---------------------------------------------------------------------------

def test_parse_reads_the_model_and_the_prompt_head():
    head = parse(b'{"model": "m", "prompt": "abcdef", "stream": true}', 3)
    assert (head.model, head.prompt_head) == ("m", "abc")
    assert parse(b'{"model": "m", "messages": 7}', 3).prompt_head == ""
    with pytest.raises(BadRequest) as err:
        parse(b'{"prompt": "x"}', 3)
    assert err.value.param == "model"


# -- routes from EndpointSlices -------------------------------------------------------------

def test_the_slice_selector_matches_what_a_models_service_labels_its_slices_with():
    labels = slice_of("m", [])["metadata"]["labels"]
    for term in SLICE_SELECTOR.split(","):
        key, _, value = term.partition("=")
        assert key in labels and (not value or labels[key] == value)


def test_routes_are_the_ready_non_terminating_endpoints_of_each_models_slices():
    slices = [
        slice_of("llama", [ep("198.18.0.5", "llama-1"), ep("198.18.0.4", "llama-0"),
                           ep("198.18.0.6", "llama-2", ready=False),
                           ep("198.18.0.7", "llama-3", terminating=True),
                           ep("198.18.0.8", "llama-4", ready=None)]),
        slice_of("llama", [ep("198.18.0.5", "llama-1")], name="llama-other"),  # a duplicate
        slice_of("idle", []),
        slice_of("v6", [ep("fd00::1", "v6-0")], address_type="IPv6"),
    ]
    routes = routes_from(slices)
    assert routes == Routes({
        "idle": ModelRoute("idle", "default", ()),
        "llama": ModelRoute("llama", "default", (
            Endpoint("198.18.0.4:8000", "http://198.18.0.4:8000", "llama-0"),
            Endpoint("198.18.0.5:8000", "http://198.18.0.5:8000", "llama-1"),
            Endpoint("198.18.0.8:8000", "http://198.18.0.8:8000", "llama-4"))),
        "v6": ModelRoute("v6", "default", (
            Endpoint("[fd00::1]:8000", "http://[fd00::1]:8000", "v6-0"),)),
    })


def test_slices_of_other_services_or_without_a_usable_port_route_nothing():
    other = slice_of("web", [ep("10.0.0.1", "web-0")])
    other["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    mismatched = slice_of("a", [ep("10.0.0.2", "a-0")])
    mismatched["metadata"]["labels"]["kvpilot.dev/model"] = "b"
    fqdn = slice_of("f", [ep("w.example", "f-0")], address_type="FQDN")
    two_ports = slice_of("p", [ep("10.0.0.3", "p-0")], ports=[
        {"name": "metrics", "port": 9}, {"name": "grpc", "port": 7}])
    one_port = slice_of("q", [ep("10.0.0.4", "q-0")], ports=[{"name": "", "port": 9000}])
    routes = routes_from([other, mismatched, fqdn, two_ports, one_port])
    assert set(routes.models) == {"f", "p", "q"}
    assert routes.models["f"].endpoints == routes.models["p"].endpoints == ()
    assert routes.models["q"].endpoints == (Endpoint("10.0.0.4:9000", "http://10.0.0.4:9000",
                                                     "q-0"),)


def test_a_model_name_in_two_namespaces_is_a_conflict_not_a_merge():
    routes = routes_from([slice_of("m", [ep("10.0.0.1", "m-0")], namespace="team-a"),
                          slice_of("m", [ep("10.0.1.1", "m-0")], namespace="team-b"),
                          slice_of("n", [ep("10.0.2.1", "n-0")], namespace="team-b")])
    assert routes.conflicts == {"m": ("team-a", "team-b")}
    assert list(routes.models) == ["n"]


def test_static_routes_name_replicas_by_address():
    routes = static_routes({"m": ["http://10.0.0.2:8000/", "http://10.0.0.1:8000"]})
    assert routes.models["m"].endpoints == (
        Endpoint("10.0.0.1:8000", "http://10.0.0.1:8000"),
        Endpoint("10.0.0.2:8000", "http://10.0.0.2:8000"))


# -- worker loads -----------------------------------------------------------------------------

METRICS = f"""# HELP {contract.KV_USAGE_RATIO} KV pages held by sequences / all KV pages (0..1).
# TYPE {contract.KV_USAGE_RATIO} gauge
{contract.KV_USAGE_RATIO}{{model="tiny"}} 0.375
{contract.KV_USAGE_RATIO}{{model="tinyer"}} 0.9
{contract.REQUESTS_RUNNING}{{model="tiny"}} 3.0
{contract.REQUESTS_WAITING}{{model="tiny"}} 2.0
{contract.REQUESTS_WAITING}_other{{model="tiny"}} 99.0
{contract.TTFT_SECONDS}_bucket{{le="0.1",model="tiny"}} 4.0
vllm:num_requests_waiting{{model_name="tiny"}} 50.0
"""


def test_parse_load_reads_the_three_gauges_of_the_model():
    assert parse_load(METRICS, "tiny") == WorkerLoad(kv_usage=0.375, running=3, waiting=2)
    assert parse_load(METRICS, "tinyer") == WorkerLoad(kv_usage=0.9, running=0, waiting=0)
    assert parse_load(METRICS, "other") is None
    assert parse_load("", "tiny") is None
    assert parse_load(f'{contract.KV_USAGE_RATIO}{{model="t"}} NaN', "t").kv_usage == 0.0
    assert parse_load(f'{contract.KV_USAGE_RATIO}{{model="t"}} 1.5', "t").kv_usage == 1.0
    assert parse_load(f'{contract.KV_USAGE_RATIO}{{model="t"}} oops', "t") is None


def test_the_load_board_adds_open_requests_to_fresh_scrapes_only():
    now = [100.0]
    board = LoadBoard(stale_after=2, clock=lambda: now[0])
    board.opened("a")
    board.opened("a")
    board.scraped("a", WorkerLoad(0.5, running=1, waiting=0))
    board.scraped("b", WorkerLoad(0.25, running=4, waiting=1))
    assert board.loads(["a", "b", "c"]) == {
        "a": Load(open=2, running=1, waiting=0, kv_usage=0.5),
        "b": Load(open=0, running=4, waiting=1, kv_usage=0.25),
        "c": Load()}
    now[0] = 103.0  # both scrapes are stale now
    board.closed("a")
    assert board.loads(["a", "b"]) == {"a": Load(open=1), "b": Load()}
    board.closed("a")
    board.closed("a")  # never below zero
    assert board.open == {}
    board.scraped("b", WorkerLoad(0.1, 0, 0))
    board.keep_only(["a"])
    assert board.loads(["b"]) == {"b": Load()}


@pytest.mark.parametrize("module", ["kvpilot.router.scoring", "kvpilot.router.prefix",
                                    "kvpilot.router.endpoints", "kvpilot.router.request",
                                    "kvpilot.router.loads", "kvpilot.router.main"])
def test_the_routers_decisions_import_nothing_heavy(module):
    from tests.layering_helpers import imported_heavy

    assert imported_heavy(module) == []
