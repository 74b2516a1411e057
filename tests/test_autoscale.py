"""``autoscale`` on tiny hand-made windows, with exact decisions."""

from __future__ import annotations

from dataclasses import replace

from kvpilot.operator.autoscale import (
    Policy, Sample, State, autoscale, bucket_increase, latency_seen, lookahead, over_target,
    recommend, trend,
)

GiB = 2**30
P = Policy(target=0.75, min_replicas=1, max_replicas=6, up_window=30, down_window=60,
           cooldown=20, max_step=2)


def s(at: float, pressure: float, replicas: int = 2, answered: int | None = None,
      waiting: int = 0, preemptions: int = 0, running: int = 8) -> Sample:
    answered = replicas if answered is None else answered
    return Sample(at, replicas, answered, int(pressure * 100 * GiB), 100 * GiB, waiting,
                  preemptions, running)


def window(pressures: list[float], step: float = 10, **kw) -> list[Sample]:
    return [s(i * step, p, **kw) for i, p in enumerate(pressures)]


def test_recommendation_follows_the_hpa_ratio_with_a_tolerance():
    assert recommend(s(0, 0.75), 0.75) == 2
    assert recommend(s(0, 0.80), 0.75) == 2  # within 10%
    assert recommend(s(0, 0.90), 0.75) == 3  # ceil(2 x 1.2)
    assert recommend(s(0, 0.30), 0.75) == 1
    assert recommend(s(0, 0.0), 0.75) == 1  # never zero
    # queueing: enough replicas to run what runs and what waits, whatever the pressure
    assert recommend(s(0, 0.76, waiting=3), 0.75) == 3  # ceil(2 x 11 / 8)
    assert recommend(s(0, 0.30, waiting=8), 0.75) == 4  # batch slots full, pages not
    assert recommend(s(0, 0.30, waiting=1, running=0), 0.75) == 2  # nothing runs: no ratio
    assert recommend(s(0, 0.76, preemptions=2), 0.75) == 3  # the cache overflows: one more
    assert recommend(s(0, 0.30, preemptions=2), 0.75) == 1
    assert recommend(s(0, 0.30, answered=1), 0.75) == 2  # a silent worker is not idle
    assert recommend(Sample(0, 2, 0), 0.75) is None


def test_sustained_pressure_scales_up_after_the_window_and_not_before():
    high = [0.95] * 3  # samples at 0, 10, 20: 20 s of pressure, window 30 s
    d = autoscale(window(high), P, 2, State())
    assert (d.replicas, d.direction) == (2, "hold")
    d = autoscale(window(high + [0.95]), P, 2, State())  # 30 s now
    assert (d.replicas, d.direction) == (3, "up")
    assert d.reason == "kv pressure 95% > target 75% for 30s"
    assert d.state == State(last_scaled_at=30)


def test_scale_up_goes_to_the_smallest_recommendation_of_the_window():
    d = autoscale(window([1.0, 0.9, 1.0, 1.0], replicas=4), P, 4, State())
    assert d.replicas == 5  # ceil(4 x 0.9 / 0.75) = 5 beats ceil(4 x 1.0 / 0.75) = 6


def test_a_single_spike_does_not_scale():
    d = autoscale(window([0.5, 0.5, 0.5, 1.0]), P, 2, State())
    assert d.direction == "hold"
    d = autoscale(window([0.5, 1.0, 1.0, 0.7]), P, 2, State())
    assert d.direction == "hold"


def test_flapping_around_the_target_is_suppressed():
    flapping = [0.95, 0.4, 0.95, 0.4, 0.95, 0.4, 0.95, 0.4]
    for end in range(1, len(flapping) + 1):
        assert autoscale(window(flapping[:end]), P, 2, State()).direction == "hold"


def test_scale_down_needs_the_whole_down_window_and_takes_the_largest_recommendation():
    low = [0.2] * 6  # 50 s of low pressure, window 60 s
    assert autoscale(window(low, replicas=4), P, 4, State()).direction == "hold"
    d = autoscale(window(low + [0.3], replicas=4), P, 4, State())
    assert (d.replicas, d.direction) == (2, "down")  # max(ceil(4 x .2/.75), ceil(4 x .3/.75))
    assert d.reason == "kv pressure 30% < target 75% for 60s"


def test_an_incomplete_sample_never_scales_down():
    low = [s(i * 10, 0.1, replicas=4, answered=3) for i in range(8)]
    assert autoscale(low, P, 4, State()).direction == "hold"


def test_an_incomplete_sample_counts_the_silent_as_empty_when_scaling_up():
    # 3 of 4 answer at 100%: as if 75% over all four, the target: no scale-up...
    full = [s(i * 10, 1.0, replicas=4, answered=3) for i in range(4)]
    assert autoscale(full, P, 4, State()).direction == "hold"
    # ... unless requests queue while the cache is over the target.
    queued = [s(i * 10, 1.0, replicas=4, answered=3, waiting=2) for i in range(4)]
    assert autoscale(queued, P, 4, State()).replicas == 5
    # 3 of 4 at 100% with capacity for 4 x 100 GiB: 300/400 = 75%; at 4 of 4 it is 100%.
    assert recommend(s(0, 1.0, replicas=4, answered=4), 0.75) == 6


def test_cooldown_holds():
    high = window([1.0] * 6)
    d = autoscale(high, P, 2, State(last_scaled_at=45))
    assert (d.direction, d.reason) == ("hold", "cooldown: last scaled 5s ago")
    assert autoscale(high, P, 2, State(last_scaled_at=30)).direction == "up"


def test_bounds_hold_whatever_the_pressure():
    assert autoscale(window([1.0] * 6, replicas=6), P, 6, State()).replicas == 6
    assert autoscale(window([0.0] * 8, replicas=1), P, 1, State()).replicas == 1
    d = autoscale([], P, 9, State())
    assert (d.replicas, d.direction, d.reason) == (6, "down", "9 replicas > maxReplicas 6")
    assert autoscale([], P, 0, State()).replicas == 1


def test_step_limits_hold():
    d = autoscale(window([1.0] * 4, replicas=2), Policy(0.5, 1, 20, 30, 60, 0, 2), 2, State())
    assert d.replicas == 4  # ceil(2 x 2) = 4 within the step of 2
    d = autoscale(window([1.0] * 4, replicas=4), Policy(0.25, 1, 20, 30, 60, 0, 2), 4, State())
    assert d.replicas == 6  # wants 16, steps by 2
    d = autoscale(window([0.0] * 8, replicas=10), Policy(0.75, 1, 20, 30, 60, 0, 3), 10,
                  State())
    assert d.replicas == 7


def test_missing_data_holds_the_current_replicas():
    assert autoscale([], P, 3, State()).direction == "hold"
    d = autoscale([Sample(0, 3, 0)], P, 3, State())
    assert (d.replicas, d.reason) == (3, "no KV metrics yet; holding")


def test_policy_from_a_model_spec():
    from kvpilot.api.model import ModelSpec

    spec = ModelSpec.model_validate({
        "weights": {"bytes": "1Gi"},
        "architecture": {"layers": 2, "attentionHeads": 4, "kvHeads": 2, "headDim": 64,
                         "maxContextTokens": 4096},
        "sla": {"contextTokens": 4096, "concurrentSequences": 4},
        "replicas": 2, "minReplicas": 1, "maxReplicas": 5,
        "autoscaling": {"enabled": True, "targetKvPressurePercent": 80,
                        "scaleUpStabilizationSeconds": 15,
                        "scaleDownStabilizationSeconds": 45, "cooldownSeconds": 5}})
    assert Policy.of(spec) == Policy(0.8, 1, 5, 15, 45, 5)


def test_a_sample_counts_preemptions_since_the_last_round_and_survives_restarts():
    from kvpilot.operator.scaling import sample
    from kvpilot.operator.scrape import WorkerMetrics

    read = [WorkerMetrics(kv_used=30, kv_capacity=100, running=4, waiting=1, preemptions=9,
                          draining=False),
            WorkerMetrics(kv_used=50, kv_capacity=100, running=6, waiting=0, preemptions=2,
                          draining=False)]
    got = sample(10.0, 3, read, {"a": 5, "b": 7}, {"a": 9, "b": 2, "c": 4})
    # a: 9 - 5; b restarted (2 < 7): its 2; c first seen: 0
    assert got == Sample(10.0, 3, 2, 80, 200, 1, 6, 10)
    assert not got.complete and got.pressure == 0.4


# --- latency and look-ahead ---------------------------------------------------------------

LA = Policy(target=0.75, min_replicas=1, max_replicas=10, up_window=0, down_window=60,
            cooldown=0, max_step=4, headroom=60, trend_window=60, miss_budget=0.01)


def d(at: float, running: int, waiting: int = 0, pressure: float = 0.5, replicas: int = 2,
      **latency) -> Sample:
    """A sample whose KV pressure and demand are set independently."""
    return Sample(at, replicas, replicas, int(pressure * 100 * GiB), 100 * GiB, waiting, 0,
                  running, **latency)


def test_over_target_splits_the_bucket_that_holds_the_target():
    buckets = ((0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 50.0))
    assert over_target(buckets, 0.5) == (50.0, 20.0)
    assert over_target(buckets, 0.3) == (50.0, 30.0)  # half of the 20 in 0.1..0.5 over
    assert over_target(buckets, 0.05) == (50.0, 45.0)  # 0..0.1 split too
    assert over_target(buckets, 5.0) == (50.0, 10.0)  # beyond the last bound: all of +Inf
    assert over_target((), 1.0) == (0.0, 0.0)


def test_bucket_increase_is_this_rounds_and_survives_restarts():
    before = ((0.1, 4.0), (float("inf"), 6.0))
    assert bucket_increase(before, ((0.1, 5.0), (float("inf"), 9.0))) == (
        (0.1, 1.0), (float("inf"), 3.0))
    assert bucket_increase(None, before) == ((0.1, 0.0), (float("inf"), 0.0))
    assert bucket_increase(before, ((0.1, 1.0), (float("inf"), 2.0))) == (
        (0.1, 1.0), (float("inf"), 2.0))  # restarted: everything is new


def test_latency_misses_beyond_the_budget_ask_for_one_more_replica():
    slow = d(0, running=10, ttft_count=100, ttft_over=5)
    assert slow.misses(0.01) == "ttft over target for 5%"
    assert slow.misses(0.10) is None and slow.misses(None) is None
    assert recommend(slow, 0.75, 0.01) == 3
    assert recommend(slow, 0.75) == 2  # latency not looked at without a budget
    # one sequence per replica: another replica would not shorten a lone prefill
    assert recommend(d(0, running=2, ttft_count=4, ttft_over=2), 0.75, 0.01) == 2
    itl = d(0, running=10, itl_count=1000, itl_over=50)
    dec = autoscale([itl], LA, 2, State())
    assert (dec.replicas, dec.reason) == (3, "itl over target for 5% (budget 1%)")


def test_latency_misses_hold_off_scale_down():
    quiet = [d(10 * i, running=3, pressure=0.1) for i in range(7)]
    assert autoscale(quiet, LA, 2, State()).replicas == 1
    quiet[3] = d(30, running=3, pressure=0.1, ttft_count=3, ttft_over=1)
    assert autoscale(quiet, LA, 2, State()).direction == "hold"


def test_trend_is_a_least_squares_line_over_the_trend_window():
    w = [d(0, 100), d(15, 10), d(30, 20), d(45, 30), d(60, 40), d(75, 50)]
    t = trend(w, 60)  # 100 at t=0 is older than the window
    assert (t.demand, t.slope, t.samples) == (50.0, 2 / 3, 5)
    assert trend(w[:2], 60) is None  # fewer than three samples
    silent = [Sample(at, 2, 1, 50 * GiB, 100 * GiB, 0, 0, 40) for at in (90, 105)]
    assert trend(w + silent, 60).samples == 3  # samples missing a worker are left out


def test_a_rising_demand_scales_up_before_the_queue_fills():
    # 20 -> 40 requests over a minute at 50% KV: the line reaches 60 within the 60 s
    # headroom, 1.5x what the newest sample needs: 2 x 0.5 / 0.75 x 1.5 = 2, still enough.
    rising = [d(15 * i, running=20 + 5 * i, pressure=0.5) for i in range(5)]
    assert lookahead(rising, LA)[0] == 2
    assert autoscale(rising, LA, 2, State()).direction == "hold"
    rising = [d(15 * i, running=20 + 5 * i, pressure=0.4 + 0.1 * i) for i in range(5)]
    dec = autoscale(rising, LA, 2, State())
    # needs 2 x 0.8 / 0.75 = 2.13 now, x (40 + 20) / 40 = 3.2 -> 4
    assert (dec.replicas, dec.direction) == (4, "up")
    assert dec.reason == "demand 40 rising 20.0/min: 60 requests within the 60s headroom"
    # without headroom the same window holds: 80% is within 10% of the target
    assert autoscale(rising, replace(LA, headroom=0), 2, State()).direction == "hold"


def test_a_flat_or_falling_demand_does_not_look_ahead():
    flat = [d(15 * i, running=40, pressure=0.5) for i in range(5)]
    assert lookahead(flat, LA) is None
    falling = [d(15 * i, running=40 - 5 * i, pressure=0.5) for i in range(5)]
    assert lookahead(falling, LA) is None
    # a rise within the tolerance (10% over the headroom) is noise
    slight = [d(15 * i, running=100 + i, pressure=0.5) for i in range(5)]
    assert lookahead(slight, LA) is None


def test_a_rising_trend_holds_off_scale_down():
    rising = [d(10 * i, running=4 + 2 * i, pressure=0.1, replicas=4) for i in range(7)]
    dec = autoscale(rising, LA, 4, State())
    assert dec.direction == "hold" and dec.reason.startswith("demand rising")
    assert autoscale(rising, replace(LA, headroom=0), 4, State()).direction == "down"


def test_policy_takes_the_operators_look_ahead_settings():
    from kvpilot.api.model import ModelSpec

    spec = ModelSpec.model_validate({
        "weights": {"bytes": "1Gi"},
        "architecture": {"layers": 2, "attentionHeads": 4, "kvHeads": 2, "headDim": 64,
                         "maxContextTokens": 4096},
        "sla": {"contextTokens": 4096, "concurrentSequences": 4},
        "replicas": 2, "minReplicas": 1, "maxReplicas": 5,
        "autoscaling": {"enabled": True}})
    p = Policy.of(spec, headroom=90, trend_window=45, miss_budget=0.02)
    assert (p.headroom, p.trend_window, p.miss_budget) == (90, 45, 0.02)


def test_latency_seen_sums_this_rounds_observations_over_workers():
    inf = float("inf")
    a0, a1 = ((0.5, 10.0), (inf, 10.0)), ((0.5, 18.0), (inf, 20.0))  # +8 fast, +2 slow
    b1 = ((0.5, 3.0), (inf, 4.0))  # first seen: its history is not this round's
    assert latency_seen([(a0, a1), (None, b1)], 0.5) == (10.0, 2.0)
    assert latency_seen([(a0, a1)], None) == (10.0, 0.0)
    assert latency_seen([], 0.5) == (0.0, 0.0)


def test_the_scrape_reads_the_workers_ttft_and_itl_buckets():
    from kvpilot.api import contract
    from kvpilot.operator.scrape import parse_metrics

    text = "\n".join([
        f'{contract.KV_USED_BYTES}{{model="m"}} 10',
        f'{contract.KV_CAPACITY_BYTES}{{model="m"}} 100',
        f"# TYPE {contract.TTFT_SECONDS} histogram",
        f'{contract.TTFT_SECONDS}_bucket{{model="m",le="0.5"}} 3',
        f'{contract.TTFT_SECONDS}_bucket{{model="m",le="+Inf"}} 4',
        f'{contract.TTFT_SECONDS}_bucket{{model="other",le="+Inf"}} 9',
        f'{contract.TTFT_SECONDS}_count{{model="m"}} 4',
        f'{contract.TTFT_SECONDS}_sum{{model="m"}} 2.5', ""])
    got = parse_metrics(text, "m")
    assert got.ttft == ((0.5, 3.0), (float("inf"), 4.0))
    assert got.itl == () and got.kv_used == 10
    assert latency_seen([(None, got.ttft)], 0.5) == (0.0, 0.0)  # first seen
