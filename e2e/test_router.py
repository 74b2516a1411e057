"""The router in front of real workers: `helm install` (CRD, RBAC, the router's own
ServiceAccount), the operator, a tiny Model of 4 replicas served by real CPU workers,
and `kvpilot router` run as processes with the token of the chart's router account.

- A shared-prefix chat workload (8 conversations x 10 turns, a system prompt common to
  all, then one per conversation) goes once through a router with ``--policy
  round-robin`` and once through one with prefix affinity: the workers' own prefix-cache
  counters give each run's hit ratio, the client each request's time to first token.
  Affinity must hit more.
- A scale-down from 4 replicas to 2 under load through the router: the draining
  replicas leave its EndpointSlices (a request that reaches one in the moment between
  gets its 503 and is retried on another); no request fails or is cut short.
- The router used its grants (list and watch EndpointSlices) and nothing else.

The figures are printed (``-s``) and kept in the test's directory as router-figures.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from kvpilot.api import contract

from e2e.chart import NAMESPACE, service_account_kubeconfig
from e2e.fleet import fleet_cluster
from e2e.load import Load, LoadThread
from e2e.operator import chart_operator, wait_for
from e2e.router import RouterProcess, metric_sum
from e2e.fleet import FLEET
from e2e.workers import Workers, endpoints, tiny_checkpoint, tiny_model

ROUTER_ACCOUNT = "kvpilot-router"
PICK_REASONS = ("prefix", "hash", "spill", "least-load", "round-robin")
MODEL = "chat"
REPLICAS = 4
CONVERSATIONS, TURNS = 8, 10
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("router-cluster"), FLEET, dra=True,
                       real_workers=True) as c:
        yield c


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory):
    """The chart installed, the operator, a kubelet's part for workers, MODEL at 4
    replicas all ready, and two routers on the router account: prefix and round-robin."""
    state = tmp_path_factory.mktemp("router-run")
    op = chart_operator(cluster, state, "e2e-router").start()
    workers = Workers(cluster, state / "workers").start()
    routers: list[RouterProcess] = []
    logs = lambda: op.log()[-3000:] + "\n" + workers.tails(1000) + "".join(  # noqa: E731
        f"\n--- router ---\n{r.log()[-2000:]}" for r in routers)
    try:
        model = tiny_model(MODEL, tiny_checkpoint(state / "tiny"), context=2048, seqs=2)
        model["spec"].update(replicas=REPLICAS, maxReplicas=REPLICAS,
                             autoscaling={"enabled": False})
        cluster.apply([model])
        wait_for(f"{REPLICAS} ready endpoints", lambda: len(endpoints(cluster, MODEL)) ==
                 REPLICAS, 300, log=logs)
        sa = service_account_kubeconfig(cluster, state / "router-sa", ROUTER_ACCOUNT)
        routers += [RouterProcess(sa, state / "router-prefix.log"),
                    RouterProcess(sa, state / "router-rr.log", "--policy=round-robin")]
        for r in routers:
            wait_for("the router ready with every replica", lambda: r.ready() and
                     r.replicas(MODEL) == REPLICAS, 60, log=logs)
        yield op, workers, routers[0], routers[1], state, logs
    finally:
        for r in routers:
            r.stop()
        workers.stop()
        op.stop()


# -- the chat workload ------------------------------------------------------------------------

WORDS = ("pages blocks tokens cache prefix decode prefill bandwidth memory replica router "
         "kernel warp tile batch queue drain").split()


def conversation_turns(phase: str, c: int) -> list[str]:
    """User turns of conversation ``c``: its own words, 60-odd characters each."""
    out = []
    for t in range(TURNS):
        words = [WORDS[(c * 7 + t * 3 + i * (c + 1)) % len(WORDS)] for i in range(9)]
        out.append(f"[{phase} c{c} t{t}] " + " ".join(words))
    return out


def system_prompt(phase: str, owner: str = "") -> str:
    # The phase first, so no run finds another's pages in a cache; ``owner`` gives each
    # conversation a system prompt of its own.
    return (f"({phase}{owner}) You are a terse assistant for an inference fleet. Answer "
            "in one line, name the unit of every number, and never repeat the question. "
            "Prefer bytes per token, tokens per second and milliseconds. ") * 2


async def chat_run(url: str, phase: str, shared_system: bool = True) -> dict:
    """8 conversations at once, each 10 turns in order; per request the time to its
    first streamed token and whether it completed. Without ``shared_system`` each
    conversation has a system prompt of its own."""
    ttfts: list[float] = []
    outcomes: list[str] = []

    async def one(client: httpx.AsyncClient, c: int) -> None:
        owner = "" if shared_system else f" c{c}"
        messages = [{"role": "system", "content": system_prompt(phase, owner)}]
        for t, text in enumerate(conversation_turns(phase, c)):
            messages.append({"role": "user", "content": text})
            started = time.perf_counter()
            first, done = None, False
            async with client.stream("POST", url + "/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 16,
                    "temperature": 0, "stream": True}) as resp:
                if resp.status_code != 200:
                    outcomes.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]}")
                    continue
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and first is None:
                        first = time.perf_counter() - started
                    done = done or line == "data: [DONE]"
            outcomes.append("complete" if done else "truncated")
            if first is not None:
                ttfts.append(first)
            # A fixed answer in the history (the tiny model's own is random bytes).
            messages.append({"role": "assistant", "content": f"noted, turn {t}."})

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
        await asyncio.gather(*(one(client, c) for c in range(CONVERSATIONS)))
    return {"seconds": time.monotonic() - started, "ttfts": ttfts, "outcomes": outcomes}


def prefix_counters(workers: Workers) -> tuple[float, float]:
    """(hit tokens, queried tokens) summed over the model's workers."""
    hits = queried = 0.0
    for p in workers.processes.values():
        if p.model != MODEL:
            continue
        text = httpx.get(p.url + contract.PATH_METRICS, timeout=5).text
        hits += metric_sum(text, contract.PREFIX_CACHE_HITS + "_total", model=MODEL)
        queried += metric_sum(text, contract.PREFIX_CACHE_QUERIES + "_total", model=MODEL)
    return hits, queried


@pytest.mark.parametrize("shared_system", [True, False], ids=["shared-system", "own-system"])
def test_prefix_affinity_hits_the_workers_prefix_caches_more_than_round_robin(
        fleet, shared_system):
    """With a system prompt common to all conversations, round robin finds it on every
    replica too, which bounds what affinity can gain; with one of their own, only the
    replica that served a conversation's last turn holds its prefix."""
    op, workers, prefix, round_robin, state, logs = fleet
    figures = {}
    for name, router in (("round-robin", round_robin), ("prefix", prefix)):
        before = prefix_counters(workers)
        picks_before = {reason: router.metric("kvpilot_router_picks_total", model=MODEL,
                                              reason=reason) for reason in PICK_REASONS}
        phase = name if shared_system else f"{name}-own"
        run = asyncio.run(chat_run(router.url, phase, shared_system))
        after = prefix_counters(workers)
        hits, queried = after[0] - before[0], after[1] - before[1]
        assert run["outcomes"] == ["complete"] * CONVERSATIONS * TURNS, (
            name, [o for o in run["outcomes"] if o != "complete"][:5], logs())
        ttfts = sorted(run["ttfts"])
        figures[name] = {
            "requests": len(run["outcomes"]), "seconds": round(run["seconds"], 1),
            "prefix_hit_ratio": round(hits / queried, 3),
            "hit_tokens": int(hits), "queried_tokens": int(queried),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p90_ms": round(1000 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "picks": {reason: n - picks_before[reason] for reason in PICK_REASONS
                      if (n := router.metric("kvpilot_router_picks_total", model=MODEL,
                                             reason=reason)) > picks_before[reason]},
        }
    figures["hit_ratio_prefix_over_round_robin"] = round(
        figures["prefix"]["prefix_hit_ratio"] / figures["round-robin"]["prefix_hit_ratio"], 2)
    figures["ttft_p50_ratio_prefix_over_round_robin"] = round(
        figures["prefix"]["ttft_p50_ms"] / figures["round-robin"]["ttft_p50_ms"], 2)
    label = "shared system prompt" if shared_system else "a system prompt per conversation"
    print(f"\nrouter chat workload, {label}:", json.dumps(figures, indent=1))
    suffix = "" if shared_system else "-own-system"
    (state / f"router-figures{suffix}.json").write_text(json.dumps(figures, indent=1))
    assert figures["prefix"]["prefix_hit_ratio"] > figures["round-robin"]["prefix_hit_ratio"], \
        figures


def test_a_scale_down_under_load_through_the_router_loses_no_request(fleet, cluster):
    op, workers, prefix, _, state, logs = fleet
    load = Load(lambda: [prefix.url], MODEL, prompt_tokens=300, max_tokens=32)
    driver = LoadThread(load)
    retried = prefix.metric("kvpilot_router_retries_total", model=MODEL)
    driver.start()
    try:
        load.clients = 6
        wait_for("requests served", lambda: load.counts["complete"] >= 20, 120, log=logs)
        cluster.kubectl("scale", f"model/{MODEL}", "--replicas=2")
        wait_for("two replicas left", lambda: len(cluster.get(
            "pods", "-l", f"kvpilot.dev/model={MODEL}")["items"]) == 2, 180, log=logs)
        wait_for("the router down to 2 replicas", lambda: prefix.replicas(MODEL) == 2, 30,
                 log=logs)
        served = load.counts["complete"]
        wait_for("requests served by the two left",
                 lambda: load.counts["complete"] >= served + 20, 120, log=logs)
    finally:
        driver.finish()
    counts = dict(load.counts)
    figures = {"requests": counts, "router_retries": prefix.metric(
        "kvpilot_router_retries_total", model=MODEL) - retried}
    print("\nscale-down through the router:", json.dumps(figures))
    with open(state / "router-figures.json", "a") as f:
        f.write(json.dumps({"scale_down": figures}) + "\n")
    assert counts.get("complete", 0) >= 40
    assert counts.get("failed", 0) == 0 and counts.get("truncated", 0) == 0, (
        counts, load.errors[:5])
    reasons = [e["reason"] for e in cluster.get("events", "-n", "default")["items"]
               if e["involvedObject"].get("name") == MODEL]
    assert "Draining" in reasons and "ReplicaLost" not in reasons, reasons


def test_the_router_used_its_grants_and_asked_for_nothing_else(fleet, cluster):
    user = f"system:serviceaccount:{NAMESPACE}:{ROUTER_ACCOUNT}"
    calls = [e for e in cluster.audit_requests(user)
             if not e.get("userAgent", "").startswith("kubectl")]
    made = {(e["verb"], (e.get("objectRef") or {}).get("resource", ""),
             (e.get("responseStatus") or {}).get("code", 0)) for e in calls}
    # (a watch is audited when it ends; the routers' are still open)
    assert ("list", "endpointslices", 200) in made, made
    assert {(verb, res) for verb, res, _ in made} <= {("list", "endpointslices"),
                                                      ("watch", "endpointslices")}, made
    assert all(code < 400 for _, _, code in made), made
