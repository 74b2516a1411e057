"""`python -m e2e.cluster up|status|env|down` as a user runs it: nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from e2e import build
from e2e.cluster import _alive
from e2e.conftest import ROOT


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e2e.cluster", "--name", "lifecycle", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def isolated_env(tmp_path) -> dict:
    """Cluster state under tmp_path; the built binaries are shared."""
    (tmp_path / "bin").symlink_to(build.bin_dir())
    return {**os.environ, "KVPILOT_CACHE": str(tmp_path),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker"), str(ROOT)])}


def test_cli_up_status_down_leaves_no_process(tmp_path):
    env = isolated_env(tmp_path)
    up = cli("up", "--fleet", str(ROOT / "examples" / "fleets" / "mixed.yaml"), env=env)
    state = tmp_path / "clusters" / "lifecycle"
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"export KUBECONFIG={state / 'kubeconfig'}"
        assert "created 5 fake GPU nodes" in up.stderr
        status = json.loads(cli("status", env=env).stdout)
        assert status["ready"] is True
        assert set(status["components"].values()) == {"running"}
        assert cli("env", env=env).stdout == up.stdout
        pids = json.loads((state / "pids.json").read_text())
        assert sorted(pids) == sorted(status["components"])
        again = cli("up", env=env)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(pid) for pid in pids.values())
    assert not state.exists()
    assert "nothing was running" in cli("down", env=env).stderr


def test_demo_plans_what_the_api_server_holds(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "e2e.demo", "--plan-only"], cwd=ROOT,
                          env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert "model.kvpilot.dev/llama-3-8b created" in out
    assert "NVIDIA-H100-80GB-HBM3" in out and "81559" in out  # kubectl get nodes -L ...
    assert "replicas placed: 8 of 8" in out
    assert "cluster stopped" in demo.stderr
    assert not (tmp_path / "clusters" / "demo").exists()


def test_the_live_demo_runs_the_operator_and_real_workers_and_cleans_up(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "e2e.demo", "--duration", "90"], cwd=ROOT,
                          env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=500)
    assert demo.returncode == 0, demo.stderr[-4000:]
    out = demo.stdout
    assert "Models (kubectl get models" in out  # the live view
    assert "GPU memory allocated by the kube-scheduler:" in out
    summary = out[out.index("Summary"):]
    assert "Placed" in summary
    complete = int(summary.split("complete ")[1].split(",")[0])
    assert complete > 0
    assert "truncated 0, failed 0" in summary
    assert "cluster stopped" in demo.stderr
    assert not (tmp_path / "clusters" / "demo").exists()
