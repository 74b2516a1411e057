"""Traces (JSONL, the Azure CSV, generators), the request-count baseline rule, and the
``kvpilot simulate`` command on the examples."""

from __future__ import annotations

import json

import pytest

from kvpilot.cli import main
from kvpilot.simulator.baseline import CountPolicy, CountState, count_autoscale
from kvpilot.simulator.trace import (
    Request, Shape, Workload, generate, read_azure_csv, read_jsonl, write_jsonl,
)
from tests.conftest import EXAMPLES

TRACES = EXAMPLES / "traces"


def test_jsonl_round_trip_sorted_with_comments(tmp_path):
    path = tmp_path / "t.jsonl"
    reqs = [Request(2.5, "b", 10, 3), Request(0.0, "a", 1, 1)]
    write_jsonl(path, reqs, header="two requests")
    text = path.read_text()
    assert text.splitlines()[0] == "# two requests"
    assert json.loads(text.splitlines()[1]) == {"t": 2.5, "model": "b", "prompt": 10,
                                                "output": 3}
    assert read_jsonl(path) == [Request(0.0, "a", 1, 1), Request(2.5, "b", 10, 3)]


@pytest.mark.parametrize("line, message", [
    ('{"t": -1, "model": "a", "prompt": 1, "output": 1}', "t must be"),
    ('{"t": 0, "model": "", "prompt": 1, "output": 1}', "model must be"),
    ('{"t": 0, "model": "a", "prompt": 0, "output": 1}', "prompt must be"),
    ('{"t": 0, "model": "a", "prompt": 1, "output": true}', "output must be"),
    ('{"t": 0, "model": "a", "prompt": 1}', "missing output"),
    ('[1, 2]', "JSON object"),
    ('{"t": 0,', "not JSON"),
])
def test_bad_trace_lines_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"t": 0, "model": "a", "prompt": 1, "output": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"t\.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_the_azure_sample_reads_as_seconds_from_the_first_row():
    reqs = read_azure_csv(TRACES / "azure-sample.csv", ["m"])
    assert len(reqs) == 10
    assert reqs[0] == Request(0.0, "m", 374, 44)
    assert reqs[1].t == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert reqs[5] == Request(pytest.approx(55.125 - 46.68059, abs=1e-6), "m", 2048, 1)
    # By weight with a seed: the same seed, the same draw; both models get rows.
    a = read_azure_csv(TRACES / "azure-sample.csv", {"x": 1.0, "y": 1.0}, seed=4)
    assert a == read_azure_csv(TRACES / "azure-sample.csv", {"x": 1.0, "y": 1.0}, seed=4)
    assert {r.model for r in a} == {"x", "y"}
    assert [(r.t, r.prompt, r.output) for r in a] == [(r.t, r.prompt, r.output) for r in reqs]


def test_a_csv_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(ValueError, match="expected the columns"):
        read_azure_csv(path, ["m"])


def test_generated_requests_fit_the_context_and_bursts_raise_the_rate():
    w = Workload("m", 2.0, 1024, prompt=400, output=300, long_share=0.2)
    calm = generate([w], 3600, seed=1)
    assert all(r.prompt + r.output <= 1024 and r.prompt >= 1 and r.output >= 1 for r in calm)
    assert 0.9 * 7200 < len(calm) < 1.1 * 7200  # Poisson: 2/s for an hour
    assert sum(r.prompt >= 3 * (1024 - r.output) // 4 for r in calm) > 0.15 * len(calm)
    bursty = generate([w], 3600, Shape(bursts_per_hour=4, burst_factor=5,
                                       burst_seconds=300), seed=1)
    assert len(bursty) > 1.5 * len(calm)
    diurnal = generate([w], 3600, Shape(diurnal=0.9, period=3600), seed=1)
    first, middle = (sum(1 for r in diurnal if a <= r.t < a + 600) for a in (0, 1500))
    assert middle > 5 * first  # trough at the start, peak at half the period


def test_the_request_count_rule_averages_and_delays_scale_down():
    p = CountPolicy(target_requests=10, min_replicas=1, max_replicas=5, window=3,
                    scale_down_after=2)
    n, s = count_autoscale(25, p, 1, CountState())
    assert (n, s) == (3, CountState((25.0,), 0))  # ceil(25 / 10): up at once
    n, s = count_autoscale(5, p, n, s)  # average 15 -> 2: the first round asking fewer
    assert (n, s.downs) == (3, 1)
    n, s = count_autoscale(0, p, n, s)  # average 10 -> 1: the second, so down
    assert (n, s.downs) == (1, 0)
    n, s = count_autoscale(100, p, n, s)  # (5 + 0 + 100) / 3 = 35 -> 4
    assert n == 4 and s.history == (5.0, 0.0, 100.0)
    assert count_autoscale(1000, p, 4, s)[0] == 5  # maxReplicas
    with pytest.raises(ValueError):
        CountPolicy(target_requests=0, min_replicas=1, max_replicas=2)


def test_simulate_command_on_the_examples(capsys):
    models = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    fleet = str(EXAMPLES / "fleets" / "mixed.yaml")
    code = main(["simulate", fleet, *models, "--trace", str(TRACES / "bursty.jsonl"),
                 "-o", "json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["kvpilot", "count-based", "static-peak"]
    for r in rows:
        assert r["completed"] + r["rejected"] == r["requests"] == 1209
    # Replicas share GPUs under kvpilot; count-based gives each whole GPUs.
    assert rows[0]["peakGpus"] < rows[1]["peakGpus"]
    code = main(["simulate", fleet, *models, "--trace", str(TRACES / "azure-sample.csv"),
                 "--strategy", "count-based", "--azure-models", "llama-3-8b"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("10 requests, 4 models, 5 nodes")
    assert "count-based" in out and "kvpilot " not in out


def test_simulate_command_refuses_static_alone_and_writes_plots(tmp_path, capsys):
    models = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    fleet = str(EXAMPLES / "fleets" / "mixed.yaml")
    trace = TRACES / "azure-sample.csv"
    assert main(["simulate", fleet, *models, "--trace", str(trace),
                 "--strategy", "static-peak"]) == 2
    assert "run kvpilot too" in capsys.readouterr().err
    assert main(["simulate", fleet, *models, "--trace", str(trace), "--strategy", "kvpilot",
                 "--plots", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["gpus.png", "replicas-kvpilot.png"]
    assert (tmp_path / "gpus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_simulator_imports_no_plotting_or_cluster_library():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, kvpilot.cli, kvpilot.simulator, kvpilot.simulator.report, "
            "kvpilot.simulator.cli; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'matplotlib', 'numpy', 'kopf', 'kubernetes', 'httpx', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT,
                         env={"PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"}).stdout
    assert out.strip() == "[]"
