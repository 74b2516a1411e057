"""``benchmarks/serve.py`` end to end on CPU with the tiny shape: it writes the
checkpoint, starts this checkout's worker and HEAD's (exported with git archive) as the
operator starts them, streams completions at two concurrencies, closed loop and Poisson,
and prints its table: per run the new row, the baseline row and their ratio, with the
hardware and the read ceiling. No timings are checked: only that every row is there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from tests.conftest import ROOT  # noqa: E402


def test_serve_benchmark_prints_new_baseline_and_ratio_rows(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--shape", "tiny", "--prompt", "16",
         "--output", "6", "--concurrency", "1,2", "--rate", "inf,20",
         "--requests-per-client", "1", "--baseline", "HEAD",
         "--checkpoint", str(tmp_path / "ckpt"), "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("hardware: CPU: ") for line in lines), out.stdout
    assert any(line.startswith("read ceiling: ") for line in lines), out.stdout
    head = lines.index("conc | rate | worker | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
                       "ITL p99 ms | batch | GB/step | GB/s | of ceiling")
    assert lines[head - 1].startswith("on CPU: ")
    rows = [line.split(" | ") for line in lines[head + 1:]]
    assert [(r[0], r[1], r[2].split()[0]) for r in rows] == [
        (c, rate, worker) for rate in ("inf", "20") for c in ("1", "2")
        for worker in ("new", "baseline", "new")]
    assert all(len(r) == 12 for r in rows)
    assert [r[2] for r in rows[2::3]] == ["new / baseline"] * 4
    assert all(cell.endswith(" x") or cell in ("", "-") for r in rows[2::3] for cell in r[3:])
    assert (tmp_path / "out.json").exists()
