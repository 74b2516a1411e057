"""A short ``benchmarks/operator_soak.py`` (issue #29): 100 Models created and deleted,
50 at a time, on the real control plane. Nothing is left behind, the operator keeps
running, and its memory does not grow with the Models it has seen (a generous bound:
the long soak reports the figures)."""

from __future__ import annotations

import pytest

from benchmarks.operator_soak import run_soak
from e2e.cluster import free_port
from e2e.operator import OperatorProcess, wait_for


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def operator(dra_cluster, tmp_path_factory, metrics_port):
    op = OperatorProcess(dra_cluster, tmp_path_factory.mktemp("op") / "operator.log",
                         metrics_port=metrics_port)
    op.start()
    yield op
    op.stop()


def test_models_created_and_deleted_leave_nothing_and_no_growth(dra_cluster, operator,
                                                                  metrics_port):
    from benchmarks.operator_soak import _up

    wait_for("the operator's metrics", lambda: _up(metrics_port), 60, log=operator.log)
    batches, left = run_soak(dra_cluster, operator, metrics_port, seconds=0, models=100,
                             batch=50)
    assert left == {"pods": 0, "resourceclaims": 0, "models": 0}
    assert operator.proc.poll() is None, operator.log()[-4000:]
    again, left = run_soak(dra_cluster, operator, metrics_port, seconds=0, models=100,
                           batch=50)
    assert left == {"pods": 0, "resourceclaims": 0, "models": 0}
    assert again[-1].rss_mib < batches[-1].rss_mib + 100, (batches, again)
