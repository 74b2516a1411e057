"""How the code base holds together: test modules stand alone."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_no_test_module_imports_another():
    """What tests share lives in helper modules (tests/*_helpers.py; e2e/fleet.py,
    e2e/state.py and the rest of the harness), so a test module can be read, moved or
    deleted on its own."""
    offenders = []
    for folder in ("tests", "e2e"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for line in path.read_text().splitlines():
                if re.match(r"\s*(from|import)\s+(tests|e2e)\.test_", line):
                    offenders.append(f"{folder}/{path.name}: {line.strip()}")
    assert offenders == []
