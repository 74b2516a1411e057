"""``autoscale`` on tiny hand-made windows, with exact decisions."""

from __future__ import annotations

from kvpilot.operator.autoscale import Policy, Sample, State, autoscale, recommend

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
