"""Session fixture: one real control plane for all e2e tests, torn down at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.cluster import Cluster, install_crds

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
