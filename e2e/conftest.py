"""Session fixture: one real control plane for all e2e tests, torn down at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.cluster import Cluster, install_crds
from e2e.fake_workers import FakeWorkers
from e2e.fleet import FLEET, fleet_cluster

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    # Every component dies with this process, so even a killed test run leaves none behind.
    c = Cluster(tmp_path_factory.mktemp("cluster"), tie_to_parent=True)
    c.up()
    try:
        install_crds(c, ROOT / "crds")
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def dra_cluster(tmp_path_factory):
    """A control plane of its own for the module: FLEET's nodes, GPUs as ResourceSlices."""
    with fleet_cluster(tmp_path_factory.mktemp("dra-cluster"), FLEET, dra=True, crds=ROOT / "crds") as c:
        yield c


@pytest.fixture(scope="module")
def fakes(dra_cluster):
    """Stand-in workers for the module's pods, whose metrics and drains the test sets."""
    f = FakeWorkers(dra_cluster).start()
    yield f
    f.stop()
