"""The operator's /healthz: a standby is healthy, a leader whose fleet loop stalls is not."""

from __future__ import annotations

import httpx

from kvpilot.operator.health import Health
from kvpilot.operator.settings import Settings


def test_a_standby_is_healthy_and_a_stuck_leader_is_not():
    h = Health(stale_after=60)
    assert h.problem() is None  # standing by
    h.leading()
    assert h.problem() is None  # just took the Lease
    h.leading_since -= 61
    assert h.problem() == "leading, but no fleet pass finished for 61s"
    h.passed()
    assert h.problem() is None
    h.last_pass -= 61
    h.standing_by()  # the Lease was lost: a standby again, which is healthy
    assert h.problem() is None


def test_healthz_answers_over_http():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = Health(stale_after=60)
    server = h.serve(port)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok"
        h.leading()
        h.leading_since -= 100
        r = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert (r.status_code, r.text) == (500, "leading, but no fleet pass finished for 100s")
        assert httpx.get(f"http://127.0.0.1:{port}/other").status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_settings_refuse_a_bad_value_naming_the_variable():
    import pytest

    with pytest.raises(ValueError, match="KVPILOT_RECONCILE_SECONDS"):
        Settings.from_env({"KVPILOT_RECONCILE_SECONDS": "-1"})
    assert Settings.from_env({"KVPILOT_MODE": "dra"}, packing=0.5).packing == 0.5
