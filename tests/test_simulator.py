"""The fleet simulator on tiny worlds with hand-computed results, and its invariants.

The tiny GPU streams 10^12 B/s at the datasheet, so a decode step streams at 8.5 x 10^11
B/s (the step-time model's 0.85) plus the fixed 2 ms; the tiny model's weights are
8.5 x 10^9 bytes (10 ms a step) and a token's KV costs 2 x 1 layer x 1 head x 8 x 2
bytes = 32 bytes. Its prefill does 2 x 4.25 x 10^9 FLOPs per prompt token plus attention
at 5 x 10^14 FLOP/s (half of 1000 TFLOP/s).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvpilot.api.model import Model
from kvpilot.operator.placement import Node
from kvpilot.simulator import Request, Settings, simulate
from kvpilot.simulator.engine import (
    REJECT_CONTEXT, REJECT_DRAIN, REJECT_NO_REPLICA, REJECT_QUEUE_FULL, Strategy, count_based,
    kvpilot, static,
)
from kvpilot.simulator.report import summarize, table

GiB = 2**30
BW = 8.5e11  # bytes/s a step streams at
FIXED = 0.002
W = 8_500_000_000  # weight bytes
KV = 32  # KV bytes per token
FLOPS = 5e14


def node(name: str = "n", gpus: int = 1, hbm_gib: int = 16, bandwidth: int = 1000) -> Node:
    return Node(name, "TEST-GPU", gpus, hbm_gib * GiB, bandwidth_gbps=bandwidth,
                bf16_tflops=1000)


def model(name: str = "m", context: int = 4096, seqs: int = 4, params: int = 4_250_000_000,
          **spec) -> Model:
    return Model.model_validate({
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model", "metadata": {"name": name},
        "spec": {
            "weights": {"parameters": params, "dtype": "bf16"},
            "architecture": {"layers": 1, "attentionHeads": 1, "kvHeads": 1, "headDim": 8,
                             "maxContextTokens": 8192},
            "sla": {"contextTokens": context, "concurrentSequences": seqs},
            "runtimeOverhead": "1Gi",
            **spec,
        },
    })


def prefill(prompt: int, params: int = 4_250_000_000) -> float:
    return (2 * params * prompt + 2 * 1 * prompt**2 * 1 * 8) / FLOPS


def step(*tokens: int, tenants: int = 1, weights: int = W) -> float:
    """One decode step: the weights of every busy tenant of the GPU and the KV bytes of
    all their sequences' ``tokens``, over the bandwidth, plus the fixed cost."""
    return (weights * tenants + KV * sum(tokens)) / BW + FIXED


def test_one_request_prefills_then_decodes_in_one_segment():
    r = simulate([node()], [model()], [Request(0.0, "m", 100, 11)], kvpilot())
    # Prefill of 100 tokens gives the first token; 10 decode steps follow, each taking
    # the bytes at the segment's middle: 101 tokens + 10 // 2.
    assert r.first_token[0] == pytest.approx(prefill(100), rel=1e-12)
    assert r.finish[0] == pytest.approx(prefill(100) + 10 * step(106), rel=1e-12)
    assert r.rejected == [None] and r.preempted == [0]
    s = summarize(r)
    assert (s.completed, s.rejected, s.sla_met) == (1, 0, 1)
    assert r.gpu_seconds == pytest.approx(r.finish[0], rel=1e-12)  # one GPU, all along


def test_pages_run_out_and_the_newest_sequence_is_preempted_and_recomputed():
    # Context 64 x 2 sequences: a pool of 128 tokens, 8 pages of 16. Three requests of
    # 17 + 47 tokens: the first prefills alone (the replica was idle when it came), the
    # other two together once it is done (2 pages each for 18 tokens); at 33 tokens each
    # needs a third page: after 14 steps, 3 pages are wanted and 2 are free.
    reqs = [Request(0.0, "m", 17, 47) for _ in range(3)]
    r = simulate([node()], [model(context=64, seqs=2)], reqs, kvpilot())
    p3 = 3 * prefill(17)
    s1 = step(18 + 7, 18 + 7, 18 + 7)  # 14 steps from 18 tokens: middle at +7
    # The newest (the third) is preempted; the first two run their last 32 steps.
    s2 = step(32 + 16, 32 + 16)
    done = p3 + 14 * s1 + 32 * s2
    assert r.first_token == pytest.approx([prefill(17), p3, p3], rel=1e-12)
    assert r.finish[:2] == pytest.approx([done, done], rel=1e-12)
    # Recomputed: a prefill of its 32 tokens, then 31 steps from 33 tokens.
    s3 = step(33 + 15)
    assert r.finish[2] == pytest.approx(done + prefill(32) + 31 * s3, rel=1e-12)
    assert r.preempted == [0, 0, 1]
    s = summarize(r)
    assert (s.never_preempted, s.completed) == (2, 3)


def test_replicas_sharing_a_gpu_share_its_bandwidth():
    # Two replicas fit one 16 GiB GPU (8.5 GB weights would not fit twice: use smaller
    # weights); each gets one request.
    m = model(params=2_125_000_000, replicas=2)
    w = 4_250_000_000
    reqs = [Request(0.0, "m", 100, 11), Request(0.0, "m", 100, 11)]
    r = simulate([node()], [m], reqs, kvpilot())
    p = prefill(100, 2_125_000_000)
    # The first to decode sees the other still prefilling (100 tokens of KV); the
    # second sees the first decoding (106 at its middle).
    assert r.finish[0] == pytest.approx(p + 10 * step(106, 100, tenants=2, weights=w), rel=1e-12)
    assert r.finish[1] == pytest.approx(p + 10 * step(106, 106, tenants=2, weights=w), rel=1e-12)
    assert r.peak_gpus == 1
    # Whole GPUs per replica: on a 2-GPU node each decodes alone.
    c = simulate([node(gpus=2)], [m], reqs, count_based())
    assert c.finish == pytest.approx([p + 10 * step(106, weights=w)] * 2, rel=1e-12)
    assert c.peak_gpus == 2
    assert c.gpu_seconds == pytest.approx(2 * c.end, rel=1e-12)
    # ... and on one GPU only one replica is placed, which serves both in one batch.
    one = simulate([node()], [m], reqs, count_based())
    one_batch = 10 * step(106, 106, weights=w)  # one tenant, two sequences
    assert one.finish == pytest.approx([2 * p + one_batch] * 2, rel=1e-12)
    assert one.unplaced_rounds > 0


def test_the_kv_autoscaler_adds_a_replica_that_serves_after_the_startup_delay():
    # Slow GPU (1 GB/s): a step of the 0.85 GB model takes just over 1 s. Two requests
    # of 31 + 33 tokens hold 2 pages each after their prefills (pool: context 128 x 1
    # sequence = 8 pages); 14 steps later, at the scrape at 15 s, each holds 3: pressure
    # 6 / 8 = 75% over the 50% target, so 1 replica becomes ceil(1 x 0.75 / 0.5) = 2.
    m = model(context=128, seqs=1, params=425_000_000, minReplicas=1, maxReplicas=3,
              autoscaling={"enabled": True, "targetKvPressurePercent": 50})
    reqs = [Request(0.0, "m", 31, 33), Request(0.0, "m", 31, 33), Request(26.0, "m", 10, 2)]
    settings = Settings(startup_seconds=10, scrape_seconds=15)
    r = simulate([node(bandwidth=1)], [m], reqs, kvpilot(), settings)
    at_15, at_30 = r.timeline[0], r.timeline[1]
    assert at_15.t == 15 and at_15.models["m"] == (1, 1, 2, 0.75)  # serving, starting,
    assert at_30.t == 30 and at_30.models["m"][:3] == (2, 0, 2)  # desired, pressure
    # The third request arrives at 26 s; the new replica, ready at 25 s, is idle and
    # takes it at once (the first is busy with two).
    assert r.first_token[2] == pytest.approx(26.0 + prefill(10, 425_000_000), rel=1e-12)
    assert r.peak_replicas == {"m": 2}
    assert r.peak_gpus == 1  # the two replicas share the GPU


def test_rejections_are_counted_with_their_reason():
    m = model(context=256, seqs=1)
    reqs = [Request(0.0, "m", 200, 100),  # longer than the context
            Request(0.0, "m", 100, 100), Request(0.0, "m", 100, 100),  # 2nd waits
            Request(0.0, "m", 100, 100)]  # 3rd finds the queue full
    r = simulate([node()], [m], reqs, kvpilot(), Settings(max_waiting=1, max_num_seqs=1))
    assert r.rejected == [REJECT_CONTEXT, None, None, REJECT_QUEUE_FULL]
    cold = simulate([node()], [m], [Request(1.0, "m", 10, 10)], kvpilot(),
                    Settings(warm_start=False, startup_seconds=5))
    assert cold.rejected == [REJECT_NO_REPLICA]


def test_scale_down_drains_the_replica_and_its_requests_finish():
    # Two replicas, the load gone: the request-count rule wants 1 after its delay; the
    # replica placement removes is drained, and its long request still completes.
    m = model(context=4096, seqs=4, params=2_125_000_000, replicas=2, minReplicas=1,
              maxReplicas=2, autoscaling={"enabled": True})
    reqs = [Request(0.0, "m", 100, 3000), Request(0.0, "m", 100, 3000)]
    # 2 active requests / 4 per replica: ceil(0.5) = 1, after 3 rounds (3 s at 1 s).
    rule = replace(count_based({"m": 4}), scale_down_delay_seconds=3)
    r = simulate([node(gpus=2)], [m], reqs, rule, Settings(scrape_seconds=1))
    assert r.rejected == [None, None]
    assert [p.models["m"][2] for p in r.timeline[:4]] == [2, 2, 1, 1]  # 3 rounds asking 1
    assert r.timeline[-1].models["m"][0] == 1
    short = simulate([node(gpus=2)], [m], reqs, rule,
                     Settings(scrape_seconds=1, drain_timeout_seconds=5))
    assert short.rejected.count(REJECT_DRAIN) == 1


def test_every_request_completes_or_is_rejected_under_every_strategy():
    from kvpilot.simulator.trace import Shape, Workload, generate

    small = model("small", context=2048, seqs=8, params=1_000_000_000, maxReplicas=4,
                  autoscaling={"enabled": True, "cooldownSeconds": 0,
                               "scaleDownStabilizationSeconds": 30})
    big = model("big", context=4096, seqs=4, maxReplicas=3, autoscaling={"enabled": True})
    reqs = generate([Workload("small", 20, 2048, prompt=300, output=200, long_share=0.05),
                     Workload("big", 10, 4096, prompt=600, output=300)], 120,
                    Shape(bursts_per_hour=60, burst_factor=4, burst_seconds=20), seed=3)
    fleet = [node("a", gpus=2), node("b", gpus=2)]
    strategies: list[Strategy] = [kvpilot(), count_based(), static({"small": 4, "big": 3})]
    for st in strategies:
        r = simulate(fleet, [small, big], reqs, st, Settings(startup_seconds=5,
                                                              max_waiting=8))
        for i, req in enumerate(reqs):
            done, why = r.finish[i] is not None, r.rejected[i] is not None
            assert done != why, (st.name, i)
            if done:
                assert req.t <= r.first_token[i] <= r.finish[i] <= r.end
        s = summarize(r)
        assert s.completed + s.rejected == len(reqs)
        assert s.rejected < len(reqs)


def test_the_same_trace_gives_the_same_result():
    from kvpilot.simulator.trace import Shape, Workload, generate

    m = model(context=2048, seqs=8, params=1_000_000_000, maxReplicas=4,
              autoscaling={"enabled": True})
    work = [Workload("m", 30, 2048, prompt=300, output=100)]
    a = generate(work, 60, Shape(bursts_per_hour=120, burst_seconds=10), seed=7)
    assert a == generate(work, 60, Shape(bursts_per_hour=120, burst_seconds=10), seed=7)
    assert a != generate(work, 60, Shape(bursts_per_hour=120, burst_seconds=10), seed=8)
    runs = [simulate([node(gpus=2)], [m], a, kvpilot(), Settings(startup_seconds=5))
            for _ in range(2)]
    assert runs[0].finish == runs[1].finish and runs[0].first_token == runs[1].first_token
    assert table([summarize(runs[0])]) == table([summarize(runs[1])])


def test_inputs_the_simulation_cannot_run_are_refused():
    with pytest.raises(ValueError, match="not given: x"):
        simulate([node()], [model()], [Request(0.0, "x", 1, 1)], kvpilot())
    with pytest.raises(ValueError, match="bandwidth or bf16"):
        simulate([Node("n", "ACME", 1, 16 * GiB)], [model()], [], kvpilot())
    with pytest.raises(ValueError, match="not sorted"):
        simulate([node()], [model()], [Request(1.0, "m", 1, 1), Request(0.0, "m", 1, 1)],
                 kvpilot())


# --- start-up: download when the node's cache lacks the weights, load, graphs ------------

def test_the_startup_model_downloads_once_per_node_and_weights():
    from kvpilot.simulator.startup import StartupModel, WeightsCache

    spec = model(params=4_250_000_000).spec  # 8.5 GB of bf16 weights
    sm = StartupModel(download_bytes_per_second=1e9, load_bytes_per_second=1e9,
                      process_seconds=5, graph_capture_seconds=2)
    assert sm.download_seconds(spec) == 8.5
    assert sm.serve_seconds(spec, 1) == 5 + 8.5 + 2
    assert sm.serve_seconds(spec, 2) == 5 + 4.25 + 2  # the ranks load their shards at once
    cache = WeightsCache()
    first = cache.start("a", "w", spec, 1, 10.0, sm)
    assert (first.waited_for_weights, first.seconds) == (8.5, 8.5 + 15.5)
    during = cache.start("a", "w", spec, 1, 12.0, sm)  # waits for the same download
    assert (during.waited_for_weights, during.seconds) == (6.5, 6.5 + 15.5)
    later = cache.start("a", "w", spec, 1, 30.0, sm)
    assert later.cached and later.seconds == 15.5
    assert cache.start("b", "w", spec, 1, 30.0, sm).waited_for_weights == 8.5  # other node
    cache.hold("c", "w")
    assert cache.holds("c", "w", 0.0) and not cache.holds("a", "w", 11.0)


def test_a_fixed_startup_overrides_the_model():
    m = model(context=128, seqs=1, params=425_000_000, minReplicas=1, maxReplicas=3,
              autoscaling={"enabled": True, "targetKvPressurePercent": 50})
    reqs = [Request(0.0, "m", 31, 33), Request(0.0, "m", 31, 33)]
    r = simulate([node(bandwidth=1)], [m], reqs, kvpilot(),
                 Settings(startup_seconds=10, scrape_seconds=15))
    assert r.starts["m"] == (1, 1, 10.0)  # one start, on the node that had the weights


def test_the_latency_signals_count_first_tokens_and_gaps_against_the_targets():
    # One sequence at a time: the second request waits for the first's 5 tokens, so its
    # first token comes after ~52 ms, over the 50 ms target; every decode gap (~12 ms)
    # is within 1 s.
    m = model(context=1024, sla={"contextTokens": 1024, "concurrentSequences": 4,
                                 "ttftMilliseconds": 50, "interTokenLatencyMilliseconds": 1000})
    from kvpilot.simulator.engine import Simulation
    sim = Simulation([node()], [m], [Request(0.0, "m", 100, 5), Request(0.0, "m", 100, 5)],
                     kvpilot(), Settings(max_num_seqs=1))
    r = sim.run()
    assert r.first_token[1] > 0.05
    run = sim.models["m"]
    assert (run.ttft_count, run.ttft_over) == (2, 1)
    assert (run.itl_count, run.itl_over) == (8, 0)


def test_time_at_the_cap_is_reported_per_model():
    m = model(replicas=2, minReplicas=1, maxReplicas=2)
    r = simulate([node(gpus=2)], [m], [Request(31.0, "m", 10, 2)], static({"m": 2}),
                 Settings(scrape_seconds=10))
    assert r.at_cap == {"m": 30.0}  # scrapes at 10, 20, 30 s, each 10 s at the cap
